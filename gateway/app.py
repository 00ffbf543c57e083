"""The application factory, ``init_app(options)``: every long-lived part is one aiohttp cleanup context.

Start-up enters the contexts in this order, each reachable through its typed application key once entered:

    STORE        the SQLite store
    SOURCES      each configured source, opened by its kind (gateway/sources/registry.py), its room lists read; while
                 its credentials are refused, its secret is read again now and then (a changed one is tried at once)
    COORDINATOR  the coordinator, syncing every room the sources own (each room's calls routed to its source)
    (feeds)      each source's change feed, watching that source's rooms, supervised: a feed that fails is logged
                 and started again with back-off (gateway/supervisor.py), its rooms polling meanwhile; room lists
                 that could not be read at start are read here later, and every room list is read again now and
                 then (rooms that joined it are connected, rooms that left it disconnected)
    API          the command service and the local API (its keys live in the store)
    TUNNEL       the tunnel to the hub, when the relay is enabled; its inbox (INBOX, made before the sources, which
                 get it as SourceSpec.inbox) passes on the Graph notifications the hub forwards
    (housekeeping)
    CREDENTIALS  the credential watch (every credential's end date and lockout: gateway/credential_watch.py) and the
                 pickup of secrets replaced in the vault (gateway/secret_pickup.py; SIGHUP too, under `gateway run`)
    GATEWAY      all of them, for tests and the CLI (and readiness)

A part that fails to start raises an error that names it (and logs ``gateway.start_failed``); aiohttp then exits,
in reverse, only the contexts that were entered, so whatever had started is released (the server's runner must
clean up after a failed set-up: ``service.serve`` and ``start_gateway`` do). Nothing here knows which kinds of
source exist.

Room lists that cannot be read at start because of a failure every room shares (refused credentials, Exchange away)
do not stop the gateway: exiting would be restarted, and every restart would be another failed logon. The rooms known
from before are kept (none is released for want of its list), the lists are read once the source answers, and their
rooms join (the feed starts again with them); the rooms kept that are in none of the lists then leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway.api import ROUTES, Api, EventHub, Peers, auth_middleware, is_loopback
from gateway.commands.organizers import OrganizerCheck
from gateway.commands.service import CommandService
from gateway.config import CommandsConfig, Config, CredentialsConfig, RelayConfig
from gateway.credential_watch import (
    CredentialWatch,
    Watched,
    account_check,
    hold_locked_accounts,
    problem_of,
    relay_check,
    source_accounts,
    source_watched,
    state_path_for,
)
from gateway.credentials import open_vault, resolve_secret
from gateway.directory.ldap import LdapDirectory
from gateway.directory_service import (
    DirectoryOptions,
    DirectoryRunner,
    PeopleRunner,
    SourcePeopleOptions,
    directory_options,
    open_directory,
    people_reader,
    source_people_options,
)
from gateway.errors import AuthError, ConfigError, GatewayError, is_shared
from gateway.model import ROOM_STATES
from gateway.observability.health import (
    Part,
    Readiness,
    credential_part,
    readiness,
    rooms_part,
    source_part,
    unread_part,
)
from gateway.observability.metrics import Metrics, StateCollector
from gateway.ports import (
    FEED_POLLING,
    AccountLookup,
    CalendarSource,
    ChangeFeed,
    FeedSettings,
    OpenedSource,
    SourceSpec,
)
from gateway.relay.inbox import RelayInbox
from gateway.relay.tunnel import Tunnel
from gateway.secret_pickup import SecretPickup, SecretUser
from gateway.security.identity import GatewayIdentity
from gateway.sharding import Shard
from gateway.sources.registry import Kinds, SourceRegistry, default_registry
from gateway.sources.routing import RoomRoutes, RoutedCalendar, RoutedWriter
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore
from gateway.supervisor import supervise, watch_task
from gateway.sync.coordinator import Coordinator, SyncSettings
from gateway.sync.people import DirectoryRoom
from gateway.sync.privacy import PrivacyPolicy

log = structlog.get_logger("gateway.app")
EVENT_SOURCE = "urn:exchange-gateway"  # the CloudEvents source of what this gateway emits
STOP_SECONDS = 10.0  # each part gets this long to stop before the next one is stopped anyway


@dataclass(frozen=True)
class GatewayOptions:
    """What the running gateway needs, typed: from the configuration (``options_from_config``) or built in code.

    ``sources`` lists the calendar sources. Tools and tests may instead give one EWS source the short way:
    ``ews`` (its EwsSettings), ``password``, ``rooms`` and ``room_lists`` make a source named ``exchange``.
    """

    sources: tuple[SourceSpec, ...] = ()
    ews: object | None = None
    password: str = field(default="", repr=False)
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
    source_name: str = EVENT_SOURCE
    clock: Callable[[], datetime] | None = None  # the sync window's "now" (tests move it; default: the real clock)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    identity: GatewayIdentity | None = None  # required when relay.enabled (loaded from the vault)
    proxy_password: str | None = field(default=None, repr=False)
    api_loopback_only: bool = True  # the local API listens on loopback only: /metrics needs no key
    journal_retention_days: int = 30
    # The password of the short form again, read afresh (from the vault; configured sources carry their own
    # ``SourceSpec.reread_secret``): while Exchange refuses the credentials, it is re-read every
    # ``password_check_seconds`` and a changed one is tried at once (no waiting out the long auth back-off).
    password_source: Callable[[], str] | None = field(default=None, repr=False)
    password_check_seconds: float = 30.0
    feed_restart_seconds: float = 5.0  # first back-off before a change feed that failed is started again
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    vault_path: Path | None = None  # watched for secrets replaced with `gateway credentials set` (None: no vault)
    secret_entries: Mapping[str, str] = field(default_factory=dict)  # source -> its vault entry (for remedies)
    accounts: AccountLookup | None = None  # the directory's accounts: service accounts' password expiry and lockout
    directory_accounts: tuple[tuple[str, str], ...] = ()  # (credential label, account) the directory binds as
    credential_state: Path | None = None  # what the credential watch has told (None: beside the store)
    reload_on_sighup: bool = False  # `gateway run`: SIGHUP reads every secret again
    directory: DirectoryOptions | None = None  # the organisation's directory (people, rooms), if configured
    people_sources: tuple[SourcePeopleOptions, ...] = ()  # sources whose own directory relays people (Graph)
    room_list_seconds: float = 300.0  # how often each source's room lists are read again (rooms join and leave)
    # One of several replicas sharing the rooms: it syncs only the rooms that hash to its ordinal (gateway/sharding.py)
    shard: Shard = field(default_factory=Shard)
    peer_url: str | None = None  # replicas.peer_url: where a command for another replica's room is forwarded
    # Rooms may change owner (several replicas, or a StatefulSet's pod that may be scaled): a room's event sequence
    # starts from the clock, so it keeps rising across owners (gateway/store/sqlite.py).
    replicated: bool = False

    @property
    def calendar_sources(self) -> tuple[SourceSpec, ...]:
        if self.sources or self.ews is None:
            return self.sources
        return (SourceSpec("exchange", "ews", self.ews, self.password, self.rooms, self.room_lists,
                           reread_secret=self.password_source),)

    @property
    def feed_settings(self) -> FeedSettings:
        return FeedSettings(self.feed, self.stream_timeout_minutes, self.group_size, self.pull_interval_seconds,
                            self.feed_retry_seconds)


@dataclass
class RunningSource:
    """An opened source, the rooms it owns (its mailboxes and its room lists' rooms) and its feed's task."""

    opened: OpenedSource
    rooms: list[str]
    feed_task: asyncio.Task[None] | None = None
    unread: list[str] = field(default_factory=list)  # room lists that could not be read yet (a shared failure)
    unread_key: str = ""  # why (the failure's key)
    failed_lists: set[str] = field(default_factory=set)  # room lists whose last read failed (said once)
    listed: set[str] = field(default_factory=set)  # the rooms its room lists hold (the directory does not drop them)
    feed_down: bool = False  # its feed failed and has not subscribed since (its rooms poll)
    rooms_changed: asyncio.Event = field(default_factory=asyncio.Event)  # the feed watches again with the rooms
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # its credentials and room-list tasks
    secret: SecretUser | None = None  # its secret, read again when the vault changes or it is refused
    elsewhere: dict[str, int] = field(default_factory=dict)  # its rooms other replicas own: room -> owner ordinal

    def shard(self, shard: Shard, rooms: list[str]) -> list[str]:
        """Keep the rooms this replica owns; the others are another replica's. The owned ones are returned."""
        owners = {room: shard.owner(room) for room in rooms}
        self.elsewhere.update({room: o for room, o in owners.items() if o != shard.ordinal})
        return [room for room, o in owners.items() if o == shard.ordinal]

    @property
    def feed(self) -> ChangeFeed | None:
        return self.opened.feed


@dataclass
class Gateway:
    """The running parts, reachable from tests and the CLI through ``app[GATEWAY]``."""

    options: GatewayOptions
    metrics: Metrics
    store: SqliteStore
    sources: dict[str, RunningSource]
    routes: RoomRoutes
    coordinator: Coordinator
    hub: EventHub
    api: Api
    commands: CommandService
    tunnel: Tunnel | None = None
    credentials: CredentialWatch | None = None
    secrets: SecretPickup | None = None
    runner: web.AppRunner | None = None  # set by start_gateway (no listener): stop_gateway cleans it up

    @property
    def rooms(self) -> list[str]:
        """Every room this gateway owns."""
        return self.routes.rooms()

    @property
    def source(self) -> CalendarSource:
        """The calendar the coordinator reads (every source, each room routed to its own)."""
        return self.coordinator.source

    @property
    def feed(self) -> ChangeFeed | None:
        """The change feed of the first source (the only one in the single-source form)."""
        return next(iter(self.sources.values())).feed if self.sources else None

    def readiness(self) -> Readiness:
        # A hub outage does not make the gateway unready: local clients are still served, events wait in the outbox.
        workers = self.coordinator.workers
        parts = [source_part(name, [workers[r].state for r in s.rooms if r in workers])
                 for name, s in self.sources.items()]
        parts += [unread_part(name, s.unread_key) for name, s in self.sources.items() if s.unread and not s.rooms]
        parts += [Part(f"feed of {name}", "stopped") for name, s in self.sources.items()
                  if s.feed_task is not None and s.feed_task.done()]
        parts.append(rooms_part(w.state for w in workers.values()))
        if self.credentials is not None:  # a source's credential that stops it (not the relay key: hub outages
            now = datetime.now(UTC)       # leave the gateway ready)
            parts += [credential_part(e.credential, problem) for e in self.credentials.current
                      if e.credential.startswith("source:") and (problem := problem_of(e, now))]
        return readiness(parts)


STORE = web.AppKey("store", SqliteStore)
SOURCES = web.AppKey[dict[str, RunningSource]]("sources")
ROOM_ROUTES = web.AppKey("room_routes", RoomRoutes)
COORDINATOR = web.AppKey("coordinator", Coordinator)
EVENTS = web.AppKey("events", EventHub)
API = web.AppKey("api", Api)
COMMANDS = web.AppKey("commands", CommandService)
TUNNEL = web.AppKey[Tunnel | None]("tunnel")
CREDENTIALS = web.AppKey("credentials", CredentialWatch)
SECRETS = web.AppKey("secrets", SecretPickup)
INBOX = web.AppKey[RelayInbox | None]("inbox")
GATEWAY = web.AppKey("gateway", Gateway)
DIRECTORY = web.AppKey[DirectoryRunner | None]("directory")
PEOPLE = web.AppKey[list[PeopleRunner]]("people")
LDAP = web.AppKey("ldap", LdapDirectory)


def options_from_config(cfg: Config, env: Mapping[str, str] | None = None, *,
                        registry: SourceRegistry | None = None) -> GatewayOptions:
    """Typed options for the running gateway, from a validated configuration (passwords from the vault)."""
    environ = env if env is not None else os.environ
    registry = registry or default_registry()
    specs = []
    for section in cfg.calendar_sources:
        kind = registry.kind(section.kind)
        settings = kind.settings(section, cfg.place_of(section))
        if kind.capabilities.token_window and dataclasses.is_dataclass(settings) and hasattr(settings, "days_ahead"):
            # A change token made for a time window (Graph's calendarView delta) covers the sync window.
            settings = dataclasses.replace(settings, days_back=cfg.rooms.days_back,  # type: ignore[type-var]
                                           days_ahead=cfg.rooms.days_ahead)
        password = resolve_secret(section.secret_ref, cfg.vault, environ).reveal()
        specs.append(SourceSpec(section.name, section.kind, settings, password, section.mailboxes,
                                section.room_lists, reread_secret=partial(_reveal, section.secret_ref, cfg, environ)))

    def policy_for(room: str) -> PrivacyPolicy:
        p = cfg.rooms.privacy.rooms.get(room.lower(), cfg.rooms.privacy.default)
        return PrivacyPolicy(subjects=p.subject, private_subject=p.private_subject,
                             hide_private_organizer=p.hide_private_organizer)

    identity = proxy_password = None
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
        sources=tuple(specs),
        sync=SyncSettings(days_back=cfg.rooms.days_back, days_ahead=cfg.rooms.days_ahead,
                          debounce_seconds=s.debounce_seconds,
                          poll_seconds=s.poll_interval_seconds if s.mode == "poll" else 0.0,
                          reconcile_seconds=s.reconcile_interval_seconds,
                          max_concurrent_rooms=sum(c.max_concurrent_requests for c in cfg.calendar_sources)),
        store_path=cfg.store.path,
        feed=s.mode,
        stream_timeout_minutes=s.streaming_connection_timeout_minutes,
        group_size=s.group_size,
        pull_interval_seconds=s.poll_interval_seconds,
        privacy=policy_for,
        commands=cfg.commands,
        relay=cfg.relay,
        credentials=cfg.credentials,
        vault_path=cfg.vault.path,
        secret_entries={section.name: section.secret_ref.name for section in cfg.calendar_sources
                        if section.secret_ref.scheme == "vault"},
        identity=identity,
        proxy_password=proxy_password,
        api_loopback_only=is_loopback(cfg.api.host),
        shard=cfg.replicas.shard(environ),
        replicated=cfg.replicas.count > 1 or bool(environ.get("POD_NAME")),
        peer_url=cfg.replicas.peer_url,
        directory=directory_options(cfg, environ),
        people_sources=source_people_options(cfg),
        room_list_seconds=s.room_list_interval_seconds,
    )


def _reveal(ref: Any, cfg: Config, environ: Mapping[str, str]) -> str:
    """A source's secret, read again (from the vault or the environment)."""
    return resolve_secret(ref, cfg.vault, environ).reveal()


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


@contextlib.contextmanager
def _starting(part: str) -> Iterator[None]:
    """Say which part failed to start: in the log, and in the message of a GatewayError."""
    try:
        yield
    except GatewayError as e:
        log.error("gateway.start_failed", part=part, key=e.key, error=str(e))
        e.args = (f"{part} did not start: {e.args[0] if e.args else e.key}", *e.args[1:])
        raise
    except Exception as e:
        log.error("gateway.start_failed", part=part, error=repr(e))
        raise


async def _stopped(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), STOP_SECONDS)


def init_app(options: GatewayOptions, *, metrics: Metrics | None = None,
             registry: SourceRegistry | None = None) -> web.Application:
    """The gateway as an aiohttp application: its parts start when the application does (see the module)."""
    metrics = metrics or Metrics()
    kinds: Kinds = (registry or default_registry()).kinds(metrics.registry)
    app = web.Application(middlewares=[auth_middleware(lambda: app.get(API))])
    app[SOURCES] = {}
    app[ROOM_ROUTES] = RoomRoutes()
    # sources subscribe at start-up, before the tunnel connects: they get the inbox now, its URLs come later (one
    # given in code, a test's stand-in hub, is kept)
    inbox = app[INBOX] = RelayInbox(metrics.registry) if options.relay.enabled else None
    specs = tuple(replace(spec, inbox=inbox) if inbox is not None and spec.inbox is None else spec
                  for spec in options.calendar_sources)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        with _starting("the store"):
            # creates its folder 0700, or names the path and the fix
            app[STORE] = SqliteStore(options.store_path, sequence_from_clock=options.replicated)
        yield
        app[STORE].close()
        log.info("gateway.stopped")  # the store is the first part started and the last one stopped

    def source_ctx(spec: SourceSpec) -> Callable[[web.Application], AsyncIterator[None]]:
        async def ctx(app: web.Application) -> AsyncIterator[None]:
            with _starting(f"source {spec.name}"):
                running = await open_source(spec, kinds, options.feed_settings)
                running.rooms = running.shard(options.shard, running.rooms)
                try:
                    app[ROOM_ROUTES].add(spec.name, running.opened.calendar, running.opened.writer, running.rooms)
                except BaseException:
                    await running.opened.close()
                    raise
            app[SOURCES][spec.name] = running
            opened = running.opened
            if spec.reread_secret is not None and opened.set_secret is not None:
                running.secret = SecretUser(f"source {spec.name}", spec.reread_secret, opened.set_secret, spec.secret)
            if running.secret is not None and opened.outage is not None:
                task = asyncio.get_running_loop().create_task(
                    _watch_credentials(running.secret, opened, options.password_check_seconds),
                    name=f"credentials:{spec.name}")
                watch_task(f"credentials:{spec.name}", task)
                running.tasks.append(task)
            yield
            for task in running.tasks:
                await _stopped(task)
            app[ROOM_ROUTES].remove(spec.name)
            del app[SOURCES][spec.name]
            await running.opened.close()
        return ctx

    async def coordinator_ctx(app: web.Application) -> AsyncIterator[None]:
        with _starting("the coordinator"):
            routes = app[ROOM_ROUTES]
            await _keep_rooms_of_unread_lists(app[STORE], app[SOURCES], routes, options.shard)
            sync = dataclasses.replace(options.sync, announce_snapshots=options.sync.announce_snapshots
                                       or options.replicated)  # a room's new owner frames its import
            coordinator = Coordinator(RoutedCalendar(routes), app[STORE], sync,
                                      policy=options.privacy, metrics=metrics, clock=options.clock,
                                      source_name=options.source_name, group=routes.owner)
            app[EVENTS] = EventHub()
            coordinator.listeners.append(app[EVENTS].notify)
            app[COORDINATOR] = coordinator
            loop = asyncio.get_running_loop()
            for name, running in app[SOURCES].items():
                if running.opened.outage is not None:
                    running.opened.outage.listeners.append(partial(_recovered, loop, coordinator, name))
            await coordinator.start(routes.rooms())
        yield
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(coordinator.stop(), STOP_SECONDS)

    def feed_ctx(name: str) -> Callable[[web.Application], AsyncIterator[None]]:
        async def ctx(app: web.Application) -> AsyncIterator[None]:
            running = app[SOURCES][name]
            loop = asyncio.get_running_loop()
            if running.feed is not None:
                task = f"feed:{options.feed}" + (f" of {name}" if len(specs) > 1 else "")
                running.feed_task = loop.create_task(
                    _run_feed(running, app[COORDINATOR], task, options.feed_restart_seconds), name=f"feed:{name}")
            spec = next(s for s in specs if s.name == name)
            if spec.room_lists:
                lists = loop.create_task(_keep_room_lists(
                    spec, running, app[ROOM_ROUTES], app[COORDINATOR], retry_seconds=options.sync.retry_seconds,
                    refresh_seconds=options.room_list_seconds, shard=options.shard, from_directory=from_directory),
                    name=f"room-lists:{name}")
                watch_task(f"room-lists:{name}", lists)
                running.tasks.append(lists)
            yield
            running.opened.stop_feed()
            await _stopped(running.feed_task)
        return ctx

    async def api_ctx(app: web.Application) -> AsyncIterator[None]:
        store, coordinator = app[STORE], app[COORDINATOR]
        with _starting("the command service and the local API"):
            journal = CommandJournal(store)
            d, ldap = options.directory, app.get(LDAP)
            organizers = None if d is None or ldap is None else OrganizerCheck(
                ldap, options.commands, people=lambda: store.people(d.stream),
                people_state=lambda: store.people_state(d.stream))
            app[COMMANDS] = CommandService(
                RoutedWriter(app[ROOM_ROUTES]), store, journal, options.commands,
                rooms=lambda: coordinator.workers.keys(),
                resync=lambda room, uids: coordinator.mark_dirty(room, "command", uids), metrics=metrics,
                window=coordinator.window, organizers=organizers)

            def room_states() -> dict[str, dict[str, Any]]:
                now = time.monotonic()
                out: dict[str, dict[str, Any]] = {}
                for email, w in coordinator.workers.items():
                    # (a worker takes its state and row as the step that stores them is queued: the reason shown
                    # is the state's own, not the last stored row's while that step is being written)
                    own = w.stored if w.stored is not None and w.stored.state == w.state else None
                    out[email] = {"state": w.state, "reason": "" if own is None else own.reason,
                                  "remedy": ("" if own is None else own.remedy) or ROOM_STATES.get(w.state, ""),
                                  "last_sync_age_seconds": None if w.last_success is None else
                                  round(now - w.last_success, 3)}
                return out

            def relay_state() -> str:
                tunnel = app[TUNNEL]
                return str(tunnel.status()["state"]) if tunnel is not None else ""

            def elsewhere() -> dict[str, int]:
                sources = list(app[SOURCES].values())
                if len(sources) == 1:
                    return sources[0].elsewhere
                return {room: o for s in sources for room, o in s.elsewhere.items()}

            streams = [d.stream for d in (options.directory, *options.people_sources) if d is not None]
            people = None if not streams else lambda: sorted(
                (k.data for stream in streams for k in store.people(stream).values()),
                key=lambda d: (d["email"], d["directory"]))
            peers = None if options.shard.single else Peers(options.shard.ordinal, elsewhere, options.peer_url)
            api = Api(store, metrics, app[EVENTS], room_states=room_states, ready=lambda: app[GATEWAY].readiness(),
                      commands=app[COMMANDS] if options.commands.enabled else None,
                      loopback_only=options.api_loopback_only,
                      relay_state=relay_state if options.relay.enabled else None, peers=peers, people=people)
            collector = StateCollector(
                rooms=lambda: {e: (w.state, w.last_success) for e, w in coordinator.workers.items()},
                outbox=store.outbox_stats if options.relay.enabled else None,  # only a hub acknowledges
                states=ROOM_STATES, source_of=app[ROOM_ROUTES].owner)
            metrics.watch(collector)
        app[API] = api
        yield
        metrics.registry.unregister(collector)
        api.close()

    from_directory: set[str] = set()  # the rooms the directory gave its rooms_source (they come and go with it)

    async def directory_open_ctx(app: web.Application) -> AsyncIterator[None]:
        """The directory, opened before the coordinator starts: the rooms it gives a source are synced from the
        start (not released and imported again at every start)."""
        d = options.directory
        if d is None:
            yield
            return
        app[LDAP] = directory = open_directory(d)
        try:
            settings = {spec.name: spec.settings for spec in options.calendar_sources}
            await hold_locked_accounts(options.accounts or directory, source_accounts(  # before any logon
                [(settings.get(name), running.opened) for name, running in app[SOURCES].items()]))
            if d.rooms_source is not None:
                running = app[SOURCES].get(d.rooms_source)
                if running is None:
                    names = ", ".join(sorted(app[SOURCES].keys())) or "none"
                    raise ConfigError(f"directory.rooms_source is '{d.rooms_source}', which is not a source",
                                      remedy=f"name one of the sources: {names}")
                try:
                    found = [r.email for r in await directory.read_rooms()]
                except GatewayError as e:  # start anyway: the rooms known from before stay with the source
                    log.error("directory.rooms_unreadable", directory=d.name, key=e.key, reason=str(e),
                              remedy=e.remedy)
                    found = [r.email for r in await asyncio.to_thread(app[STORE].rooms)
                             if app[ROOM_ROUTES].owner(r.email) is None]
                _join_rooms(app[ROOM_ROUTES], d.rooms_source, running, found, from_directory, options.shard)
        except BaseException:
            await directory.close()
            raise
        yield
        await directory.close()

    async def directory_ctx(app: web.Application) -> AsyncIterator[None]:
        d = options.directory
        if d is None:
            app[DIRECTORY] = None
            yield
            return

        async def rooms_found(found: list[DirectoryRoom]) -> None:
            assert d is not None and d.rooms_source is not None
            running, routes, coordinator = app[SOURCES][d.rooms_source], app[ROOM_ROUTES], app[COORDINATOR]
            before = set(running.rooms)
            new = _join_rooms(routes, d.rooms_source, running, [r.email for r in found], from_directory,
                              options.shard)
            fixed = {r.lower() for s in specs if s.name == d.rooms_source for r in s.rooms} | running.listed
            gone = sorted(from_directory - set(running.shard(options.shard, [r.email for r in found])) - fixed)
            from_directory.difference_update(gone)
            await _move_rooms(d.rooms_source, running, routes, coordinator, joined=new, left=gone)
            if set(running.rooms) != before:
                log.info("directory.rooms_changed", directory=d.name, source=d.rooms_source, joined=new, left=gone)
                running.rooms_changed.set()

        runner = app[DIRECTORY] = DirectoryRunner(d, app[LDAP], app[STORE], source=options.source_name,
                                                  listeners=[app[EVENTS].notify],
                                                  on_rooms=rooms_found if d.rooms_source else None,
                                                  people=options.shard.ordinal == 0)  # one replica relays people
        task = asyncio.get_running_loop().create_task(runner.run(), name=f"directory:{d.name}")
        watch_task(f"directory:{d.name}", task)
        yield
        await _stopped(task)

    async def people_ctx(app: web.Application) -> AsyncIterator[None]:
        """The people of sources that read them (Graph's people:), one sync loop each; one replica relays them."""
        runners: list[PeopleRunner] = []
        tasks: list[asyncio.Task[None]] = []
        with _starting("the people sync"):
            for p in options.people_sources if options.shard.ordinal == 0 else ():
                running = app[SOURCES].get(p.source)
                if running is None:
                    raise ConfigError(f"people are to come from source {p.source}, which is not a source")
                runners.append(PeopleRunner(p, people_reader(p.source, running.opened.directory), app[STORE],
                                            source=options.source_name, listeners=[app[EVENTS].notify]))
        app[PEOPLE] = runners
        for runner in runners:
            task = asyncio.get_running_loop().create_task(runner.run(), name=f"people:{runner.options.source}")
            watch_task(task.get_name(), task)
            tasks.append(task)
        yield
        for task in tasks:
            await _stopped(task)

    async def tunnel_ctx(app: web.Application) -> AsyncIterator[None]:
        if not options.relay.enabled:
            app[TUNNEL] = None
            yield
            return
        with _starting("the tunnel"):
            if options.identity is None:
                raise ConfigError("relay.enabled is true but no gateway identity was loaded", key="not_enrolled",
                                  remedy="enroll it once with `gateway enroll --hub https://HUB --token TOKEN`")
            shard = options.shard
            tunnel = Tunnel(options.relay, options.identity, app[STORE], app[COMMANDS], notifier=app[EVENTS],
                            metrics=metrics, proxy_password=options.proxy_password, inbox=inbox,
                            replica=None if shard.single else (shard.ordinal, shard.count))
        app[TUNNEL] = tunnel
        task = asyncio.get_running_loop().create_task(tunnel.run(), name="tunnel")
        watch_task("tunnel", task)
        yield
        await _stopped(task)
        with contextlib.suppress(Exception):
            await tunnel.close()

    async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(
            _housekeeping(app[STORE], CommandJournal(app[STORE]), relayed=app[TUNNEL] is not None,
                          journal_days=options.journal_retention_days), name="housekeeping")
        watch_task("housekeeping", task)
        yield
        await _stopped(task)

    async def credentials_ctx(app: web.Application) -> AsyncIterator[None]:
        with _starting("the credential watch"):
            d, ldap = options.directory, app.get(LDAP)
            checks = options
            if d is not None and ldap is not None:  # the directory answers for every account, its own bind included
                checks = replace(options, accounts=options.accounts or ldap,
                                 directory_accounts=(*options.directory_accounts, (d.credential, d.settings.bind)))
            watch = CredentialWatch(_credential_checks(checks, app[SOURCES], app[TUNNEL]),
                                    state_path=options.credential_state or state_path_for(options.store_path),
                                    warn_days=options.credentials.warn_days)
            collector = watch.collector()
            metrics.watch(collector)
            users = [s.secret for s in app[SOURCES].values() if s.secret is not None]
            if d is not None and ldap is not None and d.reread_secret is not None:
                users.append(SecretUser(f"directory {d.name}", d.reread_secret, ldap.set_password, d.password))
            pickup = SecretPickup(users, options.vault_path, options.credentials.vault_check_seconds,
                                  on_change=watch.check)
        app[CREDENTIALS], app[SECRETS] = watch, pickup
        loop = asyncio.get_running_loop()

        def outage_changed(failure: Exception | None) -> None:  # from the source's threads
            with contextlib.suppress(RuntimeError):  # the loop has closed: the gateway is stopping
                loop.call_soon_threadsafe(watch.wake)
        gates = [s.opened.outage for s in app[SOURCES].values() if s.opened.outage is not None]
        for gate in gates:
            gate.listeners.append(outage_changed)
        tasks = [loop.create_task(watch.run(options.credentials.check_interval_seconds), name="credential-watch"),
                 loop.create_task(pickup.run(), name="secret-pickup")]
        for task in tasks:
            watch_task(task.get_name(), task)
        if options.reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, pickup.wake)
        yield
        if options.reload_on_sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        for gate in gates:
            with contextlib.suppress(ValueError):
                gate.listeners.remove(outage_changed)
        for task in tasks:
            await _stopped(task)
        metrics.registry.unregister(collector)

    async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
        gw = app[GATEWAY] = Gateway(options, metrics, app[STORE], app[SOURCES], app[ROOM_ROUTES], app[COORDINATOR],
                                    app[EVENTS], app[API], app[COMMANDS], tunnel=app[TUNNEL],
                                    credentials=app[CREDENTIALS], secrets=app[SECRETS])
        replica = {} if options.shard.single else {
            "replica": options.shard.ordinal, "replicas": options.shard.count,
            "rooms_elsewhere": sum(len(s.elsewhere) for s in gw.sources.values())}
        log.info("gateway.started", sources=len(gw.sources), rooms=len(gw.rooms), feed=options.feed,
                 store=str(options.store_path), relay=options.relay.enabled, **replica)
        yield
        log.info("gateway.stopping")

    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.extend(source_ctx(spec) for spec in specs)
    app.cleanup_ctx.append(directory_open_ctx)
    app.cleanup_ctx.append(coordinator_ctx)
    app.cleanup_ctx.extend(feed_ctx(spec.name) for spec in specs)
    app.cleanup_ctx.extend((api_ctx, directory_ctx, people_ctx, tunnel_ctx, housekeeping_ctx, credentials_ctx,
                            gateway_ctx))

    async def forward(request: web.Request) -> web.StreamResponse:
        api = request.app.get(API)
        if api is None:
            raise web.HTTPServiceUnavailable(text="starting")
        handler = getattr(api, request.match_info.route.name or "", None)
        assert handler is not None
        return await handler(request)

    for route in ROUTES:
        app.router.add_route(route.method, route.path, forward, name=route.name)
    return app


async def open_source(spec: SourceSpec, kinds: Kinds, feed: FeedSettings) -> RunningSource:
    """Open one source through its kind and read its room lists: the rooms it owns. Closed again if that fails."""
    kind = kinds(spec.kind)
    if feed.mode not in kind.capabilities.notifications:  # a kind without it: its best instead
        log.info("source.notifications", source=spec.name, wanted=feed.mode, used=kind.capabilities.notifications[0])
        feed = replace(feed, mode=kind.capabilities.notifications[0])
    opened = kind.open(spec, feed)
    unread: list[str] = []
    key = ""
    try:
        rooms = [r.lower() for r in spec.rooms]
        for room_list in spec.room_lists:
            if opened.directory is None:
                raise ConfigError(f"source {spec.name} ({spec.kind}) has no directory to read room lists from",
                                  remedy="list its rooms under mailboxes")
            try:
                rooms += [r.email for r in await opened.directory.rooms(room_list)]
            except GatewayError as e:
                if not is_shared(e):
                    raise  # a list that does not exist: the configuration is wrong
                # Refused credentials or the source away: start anyway (see the module's docstring).
                if not unread:
                    key = e.key
                    log.error("gateway.room_lists_unreadable", source=spec.name, key=e.key,
                              reason=str(e.args[0]) if e.args else e.key, remedy=e.remedy,
                              lists=len(spec.room_lists))
                unread.append(room_list)
    except BaseException:
        await opened.close()
        raise
    fixed = {r.lower() for r in spec.rooms}
    return RunningSource(opened, sorted(set(rooms)), unread=unread, unread_key=key,
                         listed={r.lower() for r in rooms} - fixed)


async def _move_rooms(name: str, running: RunningSource, routes: RoomRoutes, coordinator: Coordinator, *,
                      joined: Sequence[str], left: Sequence[str]) -> None:
    """Rooms that joined source ``name`` and rooms that left it: the source's rooms and the routes change at once,
    the workers start, and stop after (an await each)."""
    routes.add(name, running.opened.calendar, running.opened.writer, joined)
    routes.drop(left)
    running.rooms = sorted((set(running.rooms) | set(joined)) - set(left))
    for room in joined:
        coordinator.add_room(room)
    for room in left:
        await coordinator.remove_room(room)


def _join_rooms(routes: RoomRoutes, name: str, running: RunningSource, found: list[str],
                from_directory: set[str], shard: Shard) -> list[str]:
    """Rooms the directory found join their source (a room another source owns stays there; another replica's
    goes to that replica); the new ones."""
    wanted = set(running.shard(shard, sorted({r.lower() for r in found})))
    elsewhere = sorted(r for r in wanted if routes.owner(r) not in (None, name))
    if elsewhere:
        log.error("directory.room_in_two_sources", source=name, rooms=elsewhere,
                  remedy="a room belongs to exactly one source: narrow the directory's rooms or remove it from the "
                         "other source")
    mine = wanted - set(elsewhere)
    new = sorted(mine - set(running.rooms))
    routes.add(name, running.opened.calendar, running.opened.writer, mine)
    running.rooms = sorted(set(running.rooms) | mine)
    from_directory.update(mine)
    return new


async def _keep_rooms_of_unread_lists(store: SqliteStore, sources: dict[str, RunningSource],
                                      routes: RoomRoutes, shard: Shard) -> None:
    """The rooms known from before that no source owns now stay with the source whose room lists could not be read
    (they are probably in them), instead of being released for want of their list. With several such sources
    a room's source cannot be told (the store does not keep it): they are released, and join again with their
    list."""
    waiting = [(name, s) for name, s in sources.items() if s.unread]
    if not waiting:
        return
    stored = [r.email for r in await asyncio.to_thread(store.rooms)]
    kept = sorted(r for r in stored if routes.owner(r) is None and shard.owns(r))  # another replica's: released
    if len(waiting) > 1:
        log.warning("gateway.rooms_not_kept", rooms=len(kept), sources=[name for name, _ in waiting])
        return
    name, running = waiting[0]
    if kept:
        routes.add(name, running.opened.calendar, running.opened.writer, kept)
        running.rooms = sorted(set(running.rooms) | set(kept))


def _recovered(loop: asyncio.AbstractEventLoop, coordinator: Coordinator, source: str, failure: Exception | None) \
        -> None:
    """A source's outage gate heard that it answers again (whichever call found out, a room's or the feed's): its
    rooms waiting behind the shared failure retry now. Called from the source's threads."""
    if failure is None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the gateway is stopping
            loop.call_soon_threadsafe(coordinator.exchange_recovered, source)


async def _run_feed(running: RunningSource, coordinator: Coordinator, name: str, restart_seconds: float) -> None:
    """A source's change feed, supervised: when it fails (a bug, a malformed answer: anything that is not the
    source's error for a room), its rooms poll meanwhile and say so, and a fresh feed starts after a back-off. When
    the source's rooms change (room lists read late) the feed watches again with them."""
    opened = running.opened
    fresh = [False]  # the feed opened with the source is watched first; later ones are made anew

    def on_dirty(room: str, why: str) -> None:
        if why.startswith(FEED_POLLING):  # one room's notifications cannot arrive for now (the feed runs)
            task = asyncio.get_running_loop().create_task(
                coordinator.feed_stopped(why.removeprefix(FEED_POLLING), [room]))
            running.tasks.append(task)
            return
        if why == "subscribed" and running.feed_down:
            running.feed_down = False
            task = asyncio.get_running_loop().create_task(coordinator.feed_running(running.rooms))
            running.tasks.append(task)
        elif why == "subscribed" and room in coordinator.feed_down:
            running.tasks.append(asyncio.get_running_loop().create_task(coordinator.feed_running([room])))
        coordinator.mark_dirty(room, why)

    async def run() -> None:
        while True:
            if not running.rooms:  # nothing to watch yet (its room lists are read later)
                await running.rooms_changed.wait()
                running.rooms_changed.clear()
                continue
            if fresh[0] and opened.new_feed is not None:
                opened.feed = opened.new_feed()
            fresh[0] = True
            feed = opened.feed
            if feed is None:
                return
            running.rooms_changed.clear()
            watching = asyncio.get_running_loop().create_task(feed.watch(list(running.rooms), on_dirty))
            changed = asyncio.get_running_loop().create_task(running.rooms_changed.wait())
            try:
                done, _ = await asyncio.wait({watching, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                opened.stop_feed()  # close what the feed still holds open (hanging connections are rationed)
                if not watching.done():
                    watching.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await watching
            if watching in done:
                watching.result()  # a failure goes to the supervisor; a feed that ended by itself ends here
                return
            # the rooms changed: watch again, with them

    async def down(error: BaseException, restart_seconds: float) -> None:
        running.feed_down = True
        what = f"{type(error).__name__}: {error}"  # no restart time: the rooms' reason stays put while it repeats
        await coordinator.feed_stopped(what if len(what) <= 120 else what[:119] + "\u2026", running.rooms)

    await supervise(name, run, retry_seconds=restart_seconds, on_down=down)


async def _keep_room_lists(spec: SourceSpec, running: RunningSource, routes: RoomRoutes, coordinator: Coordinator,
                           *, retry_seconds: float, refresh_seconds: float, shard: Shard,
                           from_directory: set[str]) -> None:
    """Read a source's room lists again while the gateway runs: those that could not be read at start once the
    source answers (every attempt passes the source's outage gate, so waiting costs no request), then all of them
    every ``refresh_seconds``. Rooms that joined a list are connected; once every list was read, rooms in none of
    them are disconnected and released (not those listed under mailboxes, nor those the directory gives the source).
    The change feed watches again with the rooms."""
    name = spec.name
    directory = running.opened.directory
    assert directory is not None
    fixed = {r.lower() for r in spec.rooms}
    while True:
        await asyncio.sleep(retry_seconds if running.unread else refresh_seconds)
        found: set[str] = set()
        complete = True  # every list read: a room in none of them has left
        for room_list in spec.room_lists:
            try:
                found.update(r.email.lower() for r in await directory.rooms(room_list))
            except GatewayError as e:
                complete = False
                if is_shared(e):
                    break  # still away: try again later
                if room_list in running.unread or room_list not in running.failed_lists:
                    log.error("gateway.room_list_failed", source=name, room_list=room_list, key=e.key, reason=str(e))
                running.failed_lists.add(room_list)
            else:
                running.failed_lists.discard(room_list)
            if room_list in running.unread:
                running.unread.remove(room_list)
        elsewhere = sorted(r for r in found if routes.owner(r) not in (None, name))
        if elsewhere:
            log.error("gateway.room_in_two_sources", source=name, rooms=elsewhere,
                      remedy="a room belongs to exactly one source: remove it from the mailboxes or the room list "
                             "of one of them")
        owned = set(running.shard(shard, sorted(found - set(elsewhere))))
        running.listed = owned if complete else running.listed | owned
        new = sorted(owned - set(running.rooms))
        gone = sorted(set(running.rooms) - owned - fixed - from_directory) if complete else []
        if not new and not gone:
            continue
        await _move_rooms(name, running, routes, coordinator, joined=new, left=gone)
        log.info("gateway.room_lists_read", source=name, joined=new, left=gone, rooms=len(running.rooms))
        running.rooms_changed.set()


async def _watch_credentials(secret: SecretUser, opened: OpenedSource, check_seconds: float) -> None:
    """While the source refuses its credentials, read its secret again every ``check_seconds`` (a local vault
    read), whatever the vault file's time stamp says; a changed one is handed to the source, which tries it at once.
    (A vault that changed is picked up within seconds anyway: gateway/secret_pickup.py.)"""
    outage = opened.outage
    assert outage is not None
    while True:
        await asyncio.sleep(check_seconds)
        if isinstance(outage.failure, AuthError):  # the gate holds only shared failures: this is refused credentials
            await secret.refresh()


def _credential_checks(options: GatewayOptions, sources: dict[str, RunningSource], tunnel: Tunnel | None) \
        -> list[Watched]:
    """Every credential the gateway uses: each source's service account (when its kind logs on with a user name)
    and what the source knows of its own (a CredentialProbe), the directory's bind accounts, the relay key."""
    watched = []
    settings = {spec.name: spec.settings for spec in options.calendar_sources}
    for name, running in sources.items():
        watched += source_watched(name, settings.get(name), running.opened, options.accounts,
                                  options.secret_entries.get(name))
    for label, account in options.directory_accounts:
        watched.append(Watched(label, "password", account_check(label, account, options.accounts)))
    if tunnel is not None:
        watched.append(Watched("relay", "relay_key", relay_check(tunnel.identity, tunnel.rotate_after)))
    return watched


async def start_gateway(options: GatewayOptions, metrics: Metrics | None = None, *,
                        registry: SourceRegistry | None = None) -> Gateway:
    """The gateway without a listener (benchmarks, tools, tests): the same application, its parts started."""
    runner = web.AppRunner(init_app(options, metrics=metrics, registry=registry), access_log=None)
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()  # exits the contexts that were entered
        raise
    gw = runner.app[GATEWAY]
    gw.runner = runner
    return gw


async def stop_gateway(gw: Gateway) -> None:
    if gw.runner is not None:
        await gw.runner.cleanup()


HOUSEKEEPING_SECONDS = 3600.0
OUTBOX_RETENTION = timedelta(days=7)  # acknowledged events stay this long (local SSE clients resume from them)


async def _housekeeping(store: SqliteStore, journal: CommandJournal, *, relayed: bool, journal_days: int) -> None:
    """Hourly: drop old outbox events (only acknowledged ones while a hub consumes the outbox) and old command
    journal rows."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        try:
            pruned = await asyncio.to_thread(partial(store.prune, OUTBOX_RETENTION, acked_only=relayed))
            forgotten = await asyncio.to_thread(journal.prune, timedelta(days=journal_days))
            if pruned or forgotten:
                log.info("housekeeping.pruned", outbox=pruned, journal=forgotten)
        except Exception as e:  # never let housekeeping take the gateway down
            log.warning("housekeeping.failed", error=str(e))
