"""Running the gateway: the long-lived service (`gateway run`) and one-shot operations (`rooms`, `sync-once`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway import collector
from gateway.app import (
    EVENT_SOURCE,
    GATEWAY,
    GatewayOptions,
    init_app,
    listen_error,
    open_source,
    options_from_config,
)
from gateway.config import Config, load_config
from gateway.credential_watch import describe, last_known, problem_of, remedy, state_path_for
from gateway.errors import GatewayError
from gateway.model import ROOM_STATES
from gateway.observability.metrics import Metrics
from gateway.sources.registry import default_registry
from gateway.sources.routing import RoomRoutes, RoutedCalendar
from gateway.store.sqlite import SqliteStore
from gateway.sync import ownership
from gateway.sync.coordinator import Coordinator, RoomWorker

if TYPE_CHECKING:
    from gateway.doctor import Report

log = structlog.get_logger("gateway.service")


async def serve(app: web.Application, host: str, port: int,
                ready: Callable[[web.Application, int], Awaitable[None] | None] | None = None, *,
                settings: tuple[str | None, str] = ("api.host", "api.port")) -> int:
    """Serve ``app`` until SIGINT or SIGTERM; returns the exit code. ``settings`` name what sets the host and the
    port (None: the host cannot be set), for the remedy when the address cannot be listened on."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    try:
        await runner.setup()  # the application's parts start here
    except BaseException:
        await runner.cleanup()  # a part failed: release the parts that had started
        raise
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise listen_error(e, host, port, host_setting=settings[0], port_setting=settings[1]) from None
    server: Any = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready is not None:
            result = ready(app, bound)
            if asyncio.iscoroutine(result):
                await result
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return 0


async def run(config_path: Path | None) -> int:
    cfg = load_config(config_path)
    options = replace(options_from_config(cfg), reload_on_sighup=True)  # SIGHUP: read every secret again
    app = init_app(options)
    collector.settle()

    def ready(app: web.Application, port: int) -> None:
        gw = app[GATEWAY]
        log.info("gateway.listening", api=f"http://{cfg.api.host}:{port}", rooms=len(gw.rooms),
                 events=f"http://{cfg.api.host}:{port}/v1/events", metrics=f"http://{cfg.api.host}:{port}/metrics")
    return await serve(app, cfg.api.host, cfg.api.port, ready)


def rooms(config_path: Path | None) -> int:
    """Print every room the store knows, its state, and what to do about it."""
    cfg = load_config(config_path)
    if not cfg.store.path.exists():
        print(f"no store at {cfg.store.path} yet: start the gateway (`gateway run`) first", file=sys.stderr)
        return 1
    store = SqliteStore(cfg.store.path)
    try:
        known = store.rooms()
        configured = {room for source in cfg.calendar_sources for room in source.mailboxes}
        # Each room's source (a hybrid estate: which side it is on); a room from a room list of one of several
        # sources is known to the running gateway only (/metrics: gateway_room_source_info).
        sources = cfg.calendar_sources
        owner = {room: s.name for s in sources for room in s.mailboxes}

        def source_of(email: str) -> str:
            return owner.get(email) or (sources[0].name if len(sources) == 1 else "?")
        width = max([len(r.email) for r in known] + [len(c) for c in configured] + [4])
        print(f"{'ROOM':<{width}}  {'STATE':<22} {'BOOKINGS':>8}  {'SOURCE':<12} REMEDY")
        seen = set()
        for r in sorted(known, key=lambda r: r.email):
            seen.add(r.email)
            count = len(store.known(r.email))
            remedy = "" if r.state == "verified" else (r.remedy or ROOM_STATES.get(r.state, ""))
            print(f"{r.email:<{width}}  {r.state:<22} {count:>8}  {source_of(r.email):<12} {remedy}")
        for email in sorted(configured - seen):
            print(f"{email:<{width}}  {'pending':<22} {0:>8}  {source_of(email):<12} {ROOM_STATES['pending']}")
    finally:
        store.close()
    print_credentials(state_path_for(cfg.store.path), cfg.credentials.warn_days)
    return 0


def print_credentials(state: Path, warn_days: tuple[int, ...]) -> None:
    """The credentials part of `gateway rooms`: each credential as the running gateway last checked it (nothing
    before it has run once), its end and, when close or past, what to do."""
    checked_at, found = last_known(state)
    if not found:
        return
    now = datetime.now(UTC)
    width = max(len(e.credential) for e, _ in found) + 2
    print(f"{'CREDENTIAL':<{width}}  {'KIND':<13} {'STATE':<5} EXPIRY (checked {_iso_z(checked_at)})")
    for expiry, entry in found:
        mark, text = describe(expiry, now, warn_days)
        if mark != "ok":
            text += "; " + remedy(expiry, entry, problem_of(expiry, now) or "expires")
        print(f"{expiry.credential:<{width}}  {expiry.kind:<13} {mark:<5} {text}")


def _iso_z(t: datetime | None) -> str:
    return "never" if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def forget(config_path: Path | None, room: str) -> int:
    """Withdraw a room that has left the configuration: a deletion for each of its bookings and its state
    ``disconnected`` go out, then the store forgets it (gateway/sync/ownership.py). Run it with the gateway
    stopped, after taking the room out of the configuration and before starting the gateway again."""
    cfg = load_config(config_path)
    email = room.lower()
    owner = next((s for s in cfg.calendar_sources if email in s.mailboxes), None)
    if owner is not None:
        print(f"{email} is still in the configuration ({cfg.place_of(owner)}.mailboxes): take it out first, or the "
              "gateway imports it again at its next start", file=sys.stderr)
        return 1
    return forget_room(cfg.store.path, email)


def forget_room(store_path: Path, room: str) -> int:
    if not store_path.exists():
        print(f"no store at {store_path}: there is nothing to forget", file=sys.stderr)
        return 1
    store = SqliteStore(store_path)
    try:
        if room not in {r.email for r in store.rooms()}:
            print(f"the store holds nothing of {room}: a room that left the configuration is released (dropped "
                  "without telling consumers) at the gateway's next start; forget it before that start",
                  file=sys.stderr)
            return 1
        entries = ownership.withdraw(store, room, now=datetime.now(UTC), source=EVENT_SOURCE)
    finally:
        store.close()
    log.info("room.forgotten", room=room, bookings=len(entries) - 1)
    print(f"{room}: forgotten; {len(entries) - 1} bookings withdrawn (consumers get a deletion for each, then the "
          "room's state disconnected)")
    return 0


async def sync_once(config_path: Path | None, room: str) -> int:
    """Verify one room and bring it up to date now; print what changed."""
    cfg = load_config(config_path)
    options = options_from_config(cfg)
    return await sync_room_once(options, room)


async def sync_room_once(options: GatewayOptions, room: str) -> int:
    """Verify one room and bring it up to date now, through the source that owns it."""
    kinds = default_registry().kinds(Metrics().registry)
    routes, opened = RoomRoutes(), []
    store = SqliteStore(options.store_path)
    coordinator = Coordinator(RoutedCalendar(routes), store, options.sync, policy=options.privacy, metrics=Metrics(),
                              source_name=options.source_name)
    try:
        for spec in options.calendar_sources:  # (a room list has to be read to know whether it holds the room)
            running = await open_source(spec, kinds, replace(options.feed_settings, mode="poll"))
            opened.append(running.opened)
            routes.add(spec.name, running.opened.calendar, running.opened.writer, running.rooms)
        worker = coordinator.workers.setdefault(room.lower(), RoomWorker(coordinator, room))
        try:
            await coordinator._verify(worker)
        except GatewayError as e:
            print(f"{room}: {e.key}: {e}", file=sys.stderr)
            return 1
        before = store.last_seq()
        if store.sync_state(worker.email) is None:
            await coordinator.import_room(worker)
        else:
            await coordinator.sync_changes(worker)
            await coordinator.reconcile(worker)
        entries = store.outbox_after(before, 1_000_000)
        counts: dict[str, int] = {}
        for entry in entries:
            kind = entry.event.type.rsplit(".", 2)[-2]
            counts[kind] = counts.get(kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no changes"
        print(f"{worker.email}: {worker.state}; {len(store.known(worker.email))} bookings; {summary}")
        return 0
    finally:
        for source in opened:
            await source.close()
        await coordinator.stop()
        store.close()


async def doctor(config_path: Path | None) -> int:
    """Check everything the gateway needs, one line each with a stable key and, when red, the remedy.

    Configuration by doing: it reads the file, opens the vault, logs on to Exchange once and then checks every
    room with what the gateway will use (gateway/doctor.py).
    """
    from gateway.config import check_config
    from gateway.credential_watch import Watched, account_check, relay_check
    from gateway.directory_service import open_directory
    from gateway.doctor import Report, check_booking_group, check_credentials, check_sources
    from gateway.relay.rotation import ROTATE_AFTER

    report = Report(config_path)

    def line(ok: bool, what: str, key: str = "ok", remedy: str = "") -> None:
        report.line("ok" if ok else "FAIL", what, key, remedy)

    cfg, problems = check_config(config_path)
    if cfg is None:
        for p in problems:
            line(False, f"configuration {p.where or ''}".strip(), p.key, p.message)
        report.summary()
        return 1
    report.config = cfg.source or config_path  # remedies name the file actually used
    line(True, f"configuration {cfg.source or '(defaults and environment)'}")
    print_permission_warnings(cfg, report)
    try:
        options = options_from_config(cfg)
    except GatewayError as e:
        what = {"not_enrolled": "relay identity"}.get(e.key, "service account password")
        line(False, what, e.key, e.remedy or str(e))
        report.summary()
        return 1
    line(True, "service account password (from the vault)")
    if options.relay.enabled and options.identity is not None:
        from gateway.relay.connection import probe

        line(True, f"relay identity {options.identity.gateway_id} (key {options.identity.key_id})")
        await check_credentials([Watched("relay", "relay_key", relay_check(options.identity, ROTATE_AFTER))], report,
                                options.credentials.warn_days)
        try:
            await probe(options.relay, options.proxy_password)
            line(True, f"hub {options.relay.hub_url}" + (" via the proxy" if options.relay.proxy_url else ""))
        except GatewayError as e:
            line(False, f"hub {options.relay.hub_url}", e.key, str(e))
    store_path = options.store_path
    try:
        store = SqliteStore(store_path)
        issues = store.check()
        store.close()
        line(not issues, f"store {store_path}", "ok" if not issues else "store_corrupt",
             "" if not issues else "; ".join(issues))
    except GatewayError as e:
        line(False, f"store {store_path}", e.key, e.remedy or str(e))
    d = options.directory
    ldap = open_directory(d) if d is not None else None
    try:
        if d is not None and ldap is not None:  # the directory answers for every account, its own bind included
            options = replace(options, accounts=ldap,
                              directory_accounts=(*options.directory_accounts, (d.credential, d.settings.bind)))
            await check_credentials([Watched(label, "password", account_check(label, account, ldap))
                                     for label, account in options.directory_accounts], report,
                                    options.credentials.warn_days)
            if cfg.commands.booking_group is not None:
                await check_booking_group(ldap, cfg.commands.booking_group, report)
        await check_sources(options, report, privacy=cfg.rooms.privacy)
    finally:
        if ldap is not None:
            await ldap.close()
    report.summary()
    return 1 if report.failed else 0


def print_permission_warnings(cfg: Config, report: Report | None = None) -> None:
    """``doctor``'s warnings (not failures) for state files and folders that other local users may read."""
    from gateway.security import permissions

    paths = [*permissions.sqlite_files(cfg.store.path), cfg.store.path.parent, cfg.vault.path, cfg.vault.path.parent]
    if not cfg.vault.key_env:
        paths.append(cfg.vault.key_file)
    for item in permissions.loose(dict.fromkeys(paths)):
        what = f"{'folder' if item.is_dir else 'file'} {item.path}"
        if report is not None:
            report.line("warn", what, "state_permissions_too_open", f"{item.remedy} ({item.risk})")
        else:
            print(f"warn  {what:<48} state_permissions_too_open  -> {item.remedy} ({item.risk})")
