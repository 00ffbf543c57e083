"""The organisation's directory in the running gateway and on the command line: its settings from the
configuration's ``directory:`` section, the loop that keeps its people (and its rooms, for sources that take them
from it) in sync, and ``gateway directory``, which shows what it holds. People may also come from a Graph source
(its ``people:`` setting): the source's own directory reads them (``/users`` with delta) through the same people
sync, each such source its own stream ``directory:<source name>``.

Wiring: it names the LDAP adapter (gateway/directory/ldap.py) and the store, and opens Graph sources through the
source registry; the people sync itself is core (gateway/sync/people.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config, DirectoryConfig, load_config
from gateway.credentials import resolve_secret
from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.errors import AuthError, ConfigError, GatewayError, NotFound
from gateway.ports import AccountStatus, CredentialExpiry, FeedSettings, OutboxEntry, SourceSpec
from gateway.retry import Backoff
from gateway.sync.people import (
    ChangeReader,
    DirectoryPerson,
    DirectoryRoom,
    PeopleStore,
    PeopleSync,
    stream_of,
)

log = structlog.get_logger("gateway.directory")


@dataclass(frozen=True)
class DirectoryOptions:
    """What the running gateway needs to keep a directory in sync."""

    name: str
    settings: LdapSettings
    password: str = field(repr=False)
    drop: tuple[str, ...] = ()
    sync_seconds: float = 300.0
    full_seconds: float = 86400.0
    reread_secret: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    rooms_source: str | None = None  # the calendar source that syncs the rooms the directory finds

    @property
    def stream(self) -> str:
        return stream_of(self.name)

    @property
    def credential(self) -> str:
        return f"directory:{self.name}"


@dataclass(frozen=True)
class SourcePeopleOptions:
    """People read by a calendar source's own directory (a Graph source's ``people:``), under its name."""

    source: str
    drop: tuple[str, ...] = ()
    sync_seconds: float = 300.0
    full_seconds: float = 86400.0

    @property
    def stream(self) -> str:
        return stream_of(self.source)


def source_people_options(cfg: Config) -> tuple[SourcePeopleOptions, ...]:
    return tuple(SourcePeopleOptions(s.name, tuple(p.drop_fields), p.sync_interval_seconds,
                                     p.full_compare_interval_seconds)
                 for s in cfg.calendar_sources if (p := getattr(s, "people", None)) is not None)


def people_reader(source: str, directory: object) -> ChangeReader:
    """A source's directory as the people sync's reader, or the error that says it cannot be one."""
    if not isinstance(directory, ChangeReader):
        raise ConfigError(f"source {source} cannot read people (only a Graph source can)",
                          remedy=f"remove people: from source {source}")
    return directory


class _Syncing:
    """What a runner's syncs came to: how many were done and failed, the failure that lasts (logged once per kind,
    and its end), and how long to wait for the next: the interval, or a back-off growing up to it after failures."""

    def __init__(self, name: str, sync_seconds: float) -> None:
        self.failure: GatewayError | None = None
        self.syncs = 0
        self.failed_syncs = 0
        self._name = name
        self._interval = sync_seconds
        self._backoff = Backoff(base=sync_seconds / 10, cap=sync_seconds, floor=1.0)

    def _synced(self) -> float:
        """A sync succeeded: the wait until the next."""
        self.syncs += 1
        if self.failure is not None:
            log.info("directory.recovered", directory=self._name)
        self.failure = None
        self._backoff.reset()
        return self._interval

    def _failed(self, e: GatewayError) -> float:
        """A sync failed with ``e``: the wait until the next."""
        if self.failure is None or self.failure.key != e.key:
            log.error("directory.sync_failed", directory=self._name, key=e.key, reason=str(e), remedy=e.remedy)
        self.failure = e
        self.failed_syncs += 1
        return self._backoff.next()


class PeopleRunner(_Syncing):
    """Keeps the people of a source's directory in sync: a sync every ``sync_seconds`` (a full comparison when
    due), with back-off after a failure (the source's own outage gate holds back requests while it is away)."""

    def __init__(self, options: SourcePeopleOptions, reader: ChangeReader, store: PeopleStore, *, source: str,
                 listeners: Sequence[Callable[[list[OutboxEntry]], None]] = ()) -> None:
        super().__init__(options.source, options.sync_seconds)
        self.options = options
        self.people = PeopleSync(reader, store, directory=options.source, drop=options.drop,
                                 full_seconds=options.full_seconds, source=source, listeners=listeners)

    async def run(self) -> None:
        while True:
            try:
                await self.people.sync()
                wait = self._synced()
            except GatewayError as e:
                wait = self._failed(e)
            await asyncio.sleep(wait)


def ldap_settings(d: DirectoryConfig) -> LdapSettings:
    return LdapSettings(urls=tuple(d.urls), bind=d.bind, base_dn=d.base_dn,
                        ca_file=str(d.ca_bundle) if d.ca_bundle else None, server_name=d.server_name,
                        start_tls=d.start_tls, people_base=d.people_base, people_filter=d.people_filter,
                        people_group=d.people_group, rooms_base=d.rooms_base, rooms_filter=d.rooms_filter,
                        room_list=d.room_list,
                        timeout_seconds=d.timeout_seconds, max_workers=d.max_concurrent_requests)


def directory_options(cfg: Config, env: Mapping[str, str]) -> DirectoryOptions | None:
    d = cfg.directory
    if d is None:
        return None
    ref, vault = d.secret_ref, cfg.vault
    return DirectoryOptions(name=d.name, settings=ldap_settings(d),
                            password=resolve_secret(ref, vault, env).reveal(), drop=tuple(d.drop_fields),
                            sync_seconds=d.sync_interval_seconds, full_seconds=d.full_compare_interval_seconds,
                            rooms_source=d.rooms_source,
                            reread_secret=lambda: resolve_secret(ref, vault, env).reveal())


def open_directory(options: DirectoryOptions) -> LdapDirectory:
    """The directory (no request yet): the Directory port, AccountLookup, and what the people sync reads."""
    return LdapDirectory(options.settings, options.password)


def expiry_of(credential: str, status: AccountStatus) -> CredentialExpiry:
    """An account's status as a credential's expiry (for the credential watch and `gateway directory`)."""
    detail = "disabled" if status.disabled else "locked out" if status.locked_out else ""
    return CredentialExpiry(credential=credential, kind="password", expires_at=status.password_expires_at,
                            locked_out=status.locked_out, detail=detail)


class DirectoryRunner(_Syncing):
    """Keeps one directory's people in sync: a sync every ``sync_seconds`` (a full comparison when due), with
    back-off after a failure. A refused bind costs one attempt; the directory itself holds further ones back."""

    def __init__(self, options: DirectoryOptions, directory: LdapDirectory, store: PeopleStore, *,
                 source: str, listeners: Sequence[Callable[[list[OutboxEntry]], None]] = (),
                 on_rooms: Callable[[list[DirectoryRoom]], Awaitable[None]] | None = None,
                 people: bool = True) -> None:
        super().__init__(options.name, options.sync_seconds)
        self.options = options
        self.sync_people = people  # False: another replica relays the people (each would relay them all)
        self.on_rooms = on_rooms  # the rooms found, each sync (the wiring connects and drops rooms)
        self.directory = directory
        self.people = PeopleSync(directory, store, directory=options.name, drop=options.drop,
                                 full_seconds=options.full_seconds, source=source, listeners=listeners)
        self._wake = asyncio.Event()
        self._password = options.password

    async def credential_expiry(self) -> list[CredentialExpiry]:
        """The bind account's expiry (ports.CredentialProbe, for the credential watch): from the directory itself."""
        status = await self.directory.account(self.options.settings.bind)
        return [expiry_of(self.options.credential, status)]

    def sync_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.sync_people:
                    await self.people.sync()
                if self.on_rooms is not None:
                    await self.on_rooms(await self.directory.read_rooms())
                wait = self._synced()
            except GatewayError as e:
                wait = self._failed(e)
                if isinstance(e, AuthError):
                    self._reread_secret()
            with_wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait_for(with_wake, wait)
            except TimeoutError:
                pass

    def _reread_secret(self) -> None:
        """While the bind is refused: a password changed in the vault is tried at once."""
        read = self.options.reread_secret
        if read is None:
            return
        try:
            new = read()
        except GatewayError:
            return
        if new != self._password:
            self._password = new
            self.directory.set_password(new)
            log.info("directory.password_changed", directory=self.options.name)


# -- gateway directory ------------------------------------------------------------------------------------------
async def report(cfg: Config, env: Mapping[str, str]) -> dict[str, Any]:
    """What the directory holds: people, rooms (with their state in this gateway, where it syncs them) and the
    credentials it can tell the expiry of (its own bind account); and the people of Graph sources with people:."""
    options = directory_options(cfg, env)
    sources = source_people_options(cfg)
    if options is None and not sources:
        raise ConfigError("no directory is configured", key="no_directory",
                          remedy="add a directory: section (config/README.md, \"The directory\"), or people: to a "
                                 "Graph source")
    people: list[tuple[str, DirectoryPerson]] = []
    rooms: list[DirectoryRoom] = []
    credentials: list[dict[str, Any]] = []
    if options is not None:
        d = open_directory(options)
        try:
            people += [(options.name, p) for p in await d.read_people()]
            rooms = await d.read_rooms()
            try:
                status = await d.account(options.settings.bind)
                credentials.append(_credential_json(expiry_of(options.credential, status), status))
            except NotFound as e:
                credentials.append({"credential": options.credential, "kind": "password", "expires_at": None,
                                    "known": False, "locked_out": False, "detail": str(e)})
        finally:
            await d.close()
    for p in sources:
        people += [(p.source, person) for person in await _source_people(cfg, env, p.source)]
    states = _room_states(cfg.store.path)
    return {
        "directory": options.name if options is not None else None,
        "directories": ([options.name] if options is not None else []) + [p.source for p in sources],
        "people": [{"id": p.id, "email": p.email, "name": p.name, "upn": p.upn, "department": p.department,
                    "enabled": p.enabled, "state": "enabled" if p.enabled else "disabled", "directory": name}
                   for name, p in sorted(people, key=lambda np: (np[1].email, np[0]))],
        "rooms": [{"id": r.id, "email": r.email, "name": r.name, "capacity": r.capacity, "location": r.location,
                   "room_lists": list(r.room_lists), "state": states.get(r.email, "not_synced")}
                  for r in sorted(rooms, key=lambda r: r.email)],
        "credentials": credentials,
    }


async def _source_people(cfg: Config, env: Mapping[str, str], name: str) -> list[DirectoryPerson]:
    """Everyone a source's directory holds (one full read), the source opened through its kind and closed again."""
    from prometheus_client import CollectorRegistry

    from gateway.sources.registry import default_registry

    section = next(s for s in cfg.calendar_sources if s.name == name)
    kind = default_registry().kinds(CollectorRegistry())(section.kind)
    spec = SourceSpec(name, section.kind, kind.settings(section, cfg.place_of(section)),
                      resolve_secret(section.secret_ref, cfg.vault, env).reveal())
    opened = kind.open(spec, FeedSettings(mode="poll"))
    try:
        return (await people_reader(name, opened.directory).read_changes(None)).people
    finally:
        await opened.close()


def _credential_json(e: CredentialExpiry, status: AccountStatus) -> dict[str, Any]:
    return {"credential": e.credential, "kind": e.kind, "account": status.name,
            "expires_at": e.expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z") if e.expires_at else None,
            "never_expires": e.known and e.expires_at is None, "known": e.known, "locked_out": e.locked_out,
            "disabled": status.disabled, "bad_password_count": status.bad_password_count, "detail": e.detail}


def _room_states(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    from gateway.store.sqlite import SqliteStore

    store = SqliteStore(path)
    try:
        return {r.email: str(r.state) for r in store.rooms()}
    finally:
        store.close()


def run_cli(config_path: Path | None, as_json: bool, env: Mapping[str, str]) -> int:
    cfg = load_config(config_path, env)
    doc = asyncio.run(report(cfg, env))
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    now = datetime.now(UTC)
    names = ", ".join(doc["directories"])
    print(f"directory {names}: {len(doc['people'])} people, {len(doc['rooms'])} rooms")
    print("\nPEOPLE")
    for p in doc["people"]:
        print(f"  {p['email']:<40} {p['state']:<9} {p['name'] or ''}")
    print("\nROOMS")
    for r in doc["rooms"]:
        cap = "" if r["capacity"] is None else f"{r['capacity']} seats"
        print(f"  {r['email']:<40} {r['state']:<12} {cap:<9} {r['name'] or ''}  {r['location'] or ''}".rstrip())
    print("\nCREDENTIALS")
    for c in doc["credentials"]:
        if c["expires_at"]:
            days = (datetime.fromisoformat(c["expires_at"].replace("Z", "+00:00")) - now).days
            when = f"expires {c['expires_at']} (in {days} days)"
        else:
            when = "never expires" if c.get("never_expires") else f"expiry unknown: {c['detail']}"
        flags = "".join(f", {f}" for f in ("locked_out", "disabled") if c.get(f))
        print(f"  {c['credential']:<24} {c.get('account', ''):<40} {when}{flags}")
    return 0

