"""The gateway's settings: one YAML file, overridden by ``GATEWAY_<SECTION>__<KEY>`` environment variables.

Read once at start-up into frozen dataclasses and passed down; nothing else reads the file or the environment.
Everything is validated in one pass and every problem is reported together — each with where it came from
(``file:line: dotted.key`` or the environment variable) and what to change — in a single ConfigError, so an
administrator fixes the file once rather than once per restart.

Environment overrides: ``GATEWAY_EXCHANGE__EWS_URL=https://…`` sets ``exchange.ews_url``; a nested setting
takes one more ``__`` (``GATEWAY_ROOMS__PRIVACY__SUBJECT=hash``). Values are converted to the setting's type
(numbers, ``true``/``false``, comma-separated lists). ``GATEWAY_CONFIG`` names the file when none is given.

Secrets never live here. ``exchange.password_ref`` says where the password is (``vault:exchange``: an entry
of the encrypted vault, stored with ``gateway credentials set exchange``; or ``env:VARIABLE``). A password
written into the file is refused, and no problem message ever repeats the value that caused it when that
value could be a secret.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError
from gateway.security.secret import NAME_PATTERN

ENV_PREFIX: Final = "GATEWAY_"
CONFIG_PATH_ENV: Final = "GATEWAY_CONFIG"

AuthMethod = Literal["ntlm", "basic"]
ExchangeVersion = Literal["Exchange2013", "Exchange2013_SP1", "Exchange2016"]
SubjectPolicy = Literal["keep", "hash", "drop"]
SyncMode = Literal["streaming", "pull", "poll"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


# -- the settings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret is kept — never the secret: ``vault:NAME`` (the encrypted vault) or ``env:VARIABLE``."""

    scheme: Literal["vault", "env"]
    name: str

    _RE = re.compile(rf"^(?:(vault):({NAME_PATTERN})|(env):([A-Za-z_][A-Za-z0-9_]*))$")

    @classmethod
    def parse(cls, text: str) -> SecretRef | None:
        m = cls._RE.match(text.strip())
        if not m:
            return None
        return cls("vault", m[2]) if m[1] else cls("env", m[4])

    def __str__(self) -> str:
        return f"{self.scheme}:{self.name}"


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    """How the gateway reaches on-premise Exchange over EWS, as its service account."""

    ews_url: str | None = None  # https://mail.contoso.com/EWS/Exchange.asmx (avoids slow, fragile Autodiscover)
    autodiscover_email: str | None = None  # a mailbox to run Autodiscover for, when ews_url is not known
    allow_insecure_http: bool = False  # accept an http:// ews_url: only for the local simulator
    auth: AuthMethod = "ntlm"  # ntlm (the on-premise default) or basic (often disabled on-premise)
    username: str = ""  # the service account: DOMAIN\user or user@domain (UPN)
    password_ref: SecretRef = SecretRef("vault", "exchange")  # where the password is, never the password
    version: ExchangeVersion = "Exchange2013_SP1"  # pinned, no guessing; Exchange 2019 speaks Exchange2016
    ca_bundle: Path | None = None  # PEM file of CAs to trust for Exchange; TLS is verified either way
    timeout_seconds: float = 60.0  # one EWS request, connect to last byte (streams have their own timeout)
    max_concurrent_requests: int = 8  # EWS calls in flight per service account; Exchange's budget is 27
    default_timezone: str = "UTC"  # IANA zone for dates Exchange gives without one (all-day events)

    @property
    def insecure(self) -> bool:
        return bool(self.ews_url and self.ews_url.lower().startswith("http://"))


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """What of a booking leaves the building (applied before the outbox)."""

    subject: SubjectPolicy = "keep"  # keep, hash (a stable digest: equal subjects match) or drop
    private_subject: str = "Private"  # the subject shown for meetings marked private
    hide_private_organizer: bool = True  # private meetings leave without organizer (and attendees)


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    default: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    rooms: Mapping[str, PrivacyPolicy] = field(default_factory=lambda: MappingProxyType({}))  # by room, lowercase

    def for_room(self, room: str) -> PrivacyPolicy:
        return self.rooms.get(room.lower(), self.default)


@dataclass(frozen=True, slots=True)
class RoomsConfig:
    """Which room mailboxes to sync and over what window."""

    mailboxes: tuple[str, ...] = ()  # room mailbox addresses, lowercase
    room_lists: tuple[str, ...] = ()  # room list (distribution group) addresses, expanded at start-up
    days_back: int = 7  # the sync window starts this many days before today
    days_ahead: int = 365  # ... and ends this many days after it
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """How the gateway learns that a room changed (the data always comes from a sync)."""

    mode: SyncMode = "streaming"  # streaming (push over a held connection), pull (subscription), poll (no subs)
    poll_interval_seconds: float = 60.0  # pull and poll: how often to ask
    debounce_seconds: float = 2.0  # wait this long after a notification; one change raises several events
    reconcile_interval_seconds: float = 21600.0  # a full re-read of each room, whatever the notifications say
    streaming_connection_timeout_minutes: int = 5  # EWS ConnectionTimeout (1..30); bounds how long stopping takes
    group_size: int = 200  # rooms per streaming connection (EWS allows at most 200)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path = Path("data/gateway.sqlite")  # the SQLite file: bookings, sync states, the outbox


@dataclass(frozen=True, slots=True)
class VaultConfig:
    """The encrypted credential vault and where its key comes from."""

    path: Path = Path("data/credentials.vault")
    key_file: Path = Path("secrets/vault.key")  # created (mode 0600) by the first `gateway credentials set`
    key_env: str | None = None  # if set: the key is in this environment variable and key_file is not used


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The local HTTP API (REST + SSE, /metrics, health)."""

    host: str = "127.0.0.1"
    port: int = 8088


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The outbound tunnel to the booking vendor's hub. Off until `gateway enroll` has run and hub_url is set."""

    enabled: bool = False
    hub_url: str | None = None  # wss://hub.vendor.example/v1/tunnel (`gateway enroll` prints it)
    ca_bundle: Path | None = None  # PEM file of CAs to trust for the hub; the hub's certificate is verified anyway
    proxy_url: str | None = None  # http://proxy.corp:3128 — the tunnel goes through it with CONNECT
    proxy_username: str | None = None
    proxy_password_ref: SecretRef | None = None  # vault:NAME or env:VARIABLE
    heartbeat_seconds: float = 20.0  # WebSocket ping interval; a peer silent for two intervals is dropped
    window: int = 2000  # events in flight without an acknowledgement
    reconnect_max_seconds: float = 60.0  # the cap of the reconnect back-off (with full jitter)


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    """What the cloud (and local API clients with the book scope) may write into Exchange."""

    enabled: bool = True
    writable_rooms: tuple[str, ...] = ("*",)  # room addresses (lowercase) or "*" for every synced room
    max_duration_minutes: int = 1440  # longest booking a command may make
    rate_per_minute: int = 120  # commands per minute, over all clients (a token bucket)
    burst: int = 30
    attendant_timeout_seconds: float = 30.0  # how long a create/update waits for the room's booking attendant


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"  # auto: console on a terminal, JSON lines otherwise


@dataclass(frozen=True, slots=True)
class Config:
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    rooms: RoomsConfig = field(default_factory=RoomsConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None  # the file these settings came from (None: defaults and environment only)


SECTIONS: Final[dict[str, type]] = {
    "exchange": ExchangeConfig, "rooms": RoomsConfig, "sync": SyncConfig, "store": StoreConfig,
    "vault": VaultConfig, "api": ApiConfig, "relay": RelayConfig, "commands": CommandsConfig,
    "logging": LoggingConfig,
}


# -- problems --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, where it is, and what to do about it."""

    where: str  # "config/gateway.yaml:12", "env GATEWAY_EXCHANGE__EWS_URL", "config/gateway.yaml" or ""
    key: str  # exchange.ews_url, rooms.mailboxes[2]
    message: str
    line: int | None = None  # in the file, when the problem is there

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}" if self.where else f"{self.key}: {self.message}"


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Read, override and validate the settings; raise one ConfigError listing every problem found."""
    config, problems = check_config(path, env)
    if problems or config is None:
        raise _error(problems, path, env)
    return config


def check_config(path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] = os.environ) -> tuple[Config | None, tuple[Problem, ...]]:
    """Like load_config, but return the problems instead of raising (for ``gateway doctor``)."""
    ctx = _read(path, env, sections=tuple(SECTIONS))
    if ctx.fatal:
        return None, ctx.ordered()
    config = _build(ctx)
    return (None if ctx.problems else config), ctx.ordered()


def load_vault_config(path: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] = os.environ) -> VaultConfig:
    """Only the vault section, so ``gateway credentials`` works while the rest of the file is still unfinished."""
    ctx = _read(path, env, sections=("vault",))
    vault = None if ctx.fatal else _vault(ctx, ctx.section("vault"))
    if ctx.problems or vault is None:
        raise _error(ctx.ordered(), path, env)
    return vault


def load_relay_config(path: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] = os.environ) -> tuple[VaultConfig, RelayConfig]:
    """Only the vault and relay sections, for `gateway enroll`: it runs before the rest of the file is finished and
    before relay.hub_url is known (enrolling is what yields it)."""
    ctx = _read(path, env, sections=("vault", "relay"))
    if ctx.fatal:
        raise _error(ctx.ordered(), path, env)
    vault = _vault(ctx, ctx.section("vault"))
    relay = _relay(ctx.section("relay"), enrolling=True)
    if ctx.problems:
        raise _error(ctx.ordered(), path, env)
    return vault, relay


def _error(problems: Iterable[Problem], path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> ConfigError:
    items = list(problems)
    source = path or env.get(CONFIG_PATH_ENV)
    origin = f" ({source} and the environment)" if source else " (from the environment)"
    noun = "problem" if len(items) == 1 else "problems"
    lines = "\n".join(f"  - {p}" for p in items)
    return ConfigError(f"the configuration{origin} has {len(items)} {noun}:\n{lines}",
                       remedy="fix these, then start again")


# -- reading the file and the environment ----------------------------------------------------------------------
_Key = tuple[str, ...]
_MISSING: Any = object()
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "pass", "secret", "client_secret", "token", "credentials"})


class _Context:
    """The raw settings (file merged with environment), where each came from, and the problems found so far."""

    def __init__(self, file: Path | None, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.data: dict[str, Any] = {}
        self.lines: dict[_Key, int] = {}
        self.env_names: dict[_Key, str] = {}
        self.problems: list[Problem] = []
        self.fatal = False

    def where(self, key: _Key) -> str:
        if key in self.env_names:
            return f"env {self.env_names[key]}"
        if self.file is None:
            return ""
        k = key
        while k:  # a missing key points at its section's line
            if k in self.lines:
                return f"{self.file}:{self.lines[k]}"
            k = k[:-1]
        return str(self.file)

    def line(self, key: _Key) -> int | None:
        if key in self.env_names:
            return None
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    def problem(self, key: _Key, message: str) -> None:
        self.problems.append(Problem(self.where(key), _dotted(key), message, self.line(key)))

    def ordered(self) -> tuple[Problem, ...]:
        """The file's problems in line order, then the environment's."""
        return tuple(sorted(self.problems, key=lambda p: (p.where.startswith("env "), p.line or 0)))

    def section(self, name: str) -> _Reader:
        return _Reader(self, (name,), self.data.get(name))


def _dotted(key: _Key) -> str:
    return ".".join(key).replace(".[", "[")


def _read(path: str | os.PathLike[str] | None, env: Mapping[str, str], sections: tuple[str, ...]) -> _Context:
    if path is None and env.get(CONFIG_PATH_ENV):
        path = env[CONFIG_PATH_ENV]
    ctx = _Context(Path(path) if path is not None else None, env)
    if ctx.file is not None:
        _read_file(ctx)
    if ctx.fatal:
        return ctx
    if len(sections) == len(SECTIONS):  # the whole file: every top-level key must be a section we know
        for name in list(ctx.data):
            if name not in SECTIONS:
                ctx.problem((name,), _unknown(name, SECTIONS, "section"))
    _read_env(ctx, sections)
    return ctx


def _read_file(ctx: _Context) -> None:
    assert ctx.file is not None
    try:
        text = ctx.file.read_text(encoding="utf-8")
    except FileNotFoundError:
        ctx.problems.append(Problem(str(ctx.file), "(file)", "there is no configuration file here; copy "
                                    "config/gateway.example.yaml and adapt it, or point --config / "
                                    f"{CONFIG_PATH_ENV} at yours"))
        ctx.fatal = True
        return
    except (OSError, UnicodeDecodeError) as e:
        ctx.problems.append(Problem(str(ctx.file), "(file)",
                                    f"cannot read it ({getattr(e, 'strerror', None) or 'not UTF-8 text'}); "
                                    "check the path and that the gateway's user may read it"))
        ctx.fatal = True
        return
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = _construct(loader, node, (), ctx) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{ctx.file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(ctx.file)
        what = getattr(e, "problem", None) or "invalid YAML"
        ctx.problems.append(Problem(where, "(syntax)", f"{what}; check the indentation, quoting and colons here",
                                    mark.line + 1 if mark is not None else None))
        ctx.fatal = True
        return
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        ctx.problems.append(Problem(f"{ctx.file}:1", "(file)",
                                    "must be a mapping of sections (exchange:, rooms:, sync: …)", 1))
        ctx.fatal = True
        return
    ctx.data = data


def _construct(loader: yaml.SafeLoader, node: yaml.Node, key: _Key, ctx: _Context) -> Any:
    """Build Python values from the node tree, remembering the line of every key and list item."""
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves << merge keys
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            raw_name = loader.construct_object(knode, deep=True)
            name = raw_name if isinstance(raw_name, str) else str(raw_name)
            child = (*key, name)
            if name in out:
                line = knode.start_mark.line + 1
                ctx.problems.append(Problem(f"{ctx.file}:{line}", _dotted(child),
                                            f"appears twice (first on line {ctx.lines[child]}); "
                                            "YAML would silently keep only the last one, so remove one", line))
            ctx.lines[child] = knode.start_mark.line + 1
            out[name] = _construct(loader, vnode, child, ctx)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = (*key, f"[{i}]")
            ctx.lines[child] = item.start_mark.line + 1
            items.append(_construct(loader, item, child, ctx))
        return items
    return loader.construct_object(node, deep=True)


def _read_env(ctx: _Context, sections: tuple[str, ...]) -> None:
    for var in sorted(ctx.env):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):]
        if "__" not in rest:
            _warn_single_underscore(ctx, var, rest.lower(), sections)
            continue
        parts = tuple(p.lower() for p in rest.split("__"))
        if parts[0] not in sections:
            if parts[0] not in SECTIONS:
                ctx.problems.append(Problem(f"env {var}", parts[0], _unknown(parts[0], SECTIONS, "section")))
            continue
        if any(not p for p in parts) or len(parts) < 2:
            ctx.problems.append(Problem(f"env {var}", ".".join(parts),
                                        "malformed name; use GATEWAY_<SECTION>__<SETTING>, "
                                        "e.g. GATEWAY_EXCHANGE__EWS_URL"))
            continue
        node: dict[str, Any] = ctx.data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
                ctx.env_names.setdefault(parts[: i + 1], var)
            node = nxt
        node[parts[-1]] = ctx.env[var]
        ctx.env_names[parts] = var


def _warn_single_underscore(ctx: _Context, var: str, rest: str, sections: tuple[str, ...]) -> None:
    # GATEWAY_EXCHANGE_EWS_URL would be silently ignored; say so (other GATEWAY_* variables are not ours)
    for section in sections:
        cls = SECTIONS[section]
        if rest.startswith(section + "_") and rest[len(section) + 1:] in {f.name for f in fields(cls)}:
            name = rest[len(section) + 1:]
            ctx.problems.append(Problem(f"env {var}", f"{section}.{name}",
                                        f"ignored: write {ENV_PREFIX}{section.upper()}__{name.upper()} "
                                        "(two underscores between section and setting)"))


def _unknown(name: str, known: Iterable[str], what: str = "setting") -> str:
    known = sorted(known)
    if name.lower() in _SECRET_WORDS:
        return ("a password or secret must not be part of the configuration; store it in the encrypted "
                "vault with `gateway credentials set exchange` and refer to it with password_ref: vault:exchange")
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known {what}s: {', '.join(known)}"
    return f"unknown {what}; {hint}"


# -- typed reading with problems collected ---------------------------------------------------------------------
_L = TypeVar("_L", bound=str)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Reader:
    """Reads one mapping of the raw settings into typed values; a bad value is reported and its default used."""

    def __init__(self, ctx: _Context, key: _Key, data: Any) -> None:
        self.ctx = ctx
        self.key = key
        self.known: list[str] = []
        if data is None:
            data = {}
        if not isinstance(data, dict):
            ctx.problem(key, "must be a mapping of settings (indented `name: value` lines below it)")
            data = {}
        self.data: dict[str, Any] = data

    def problem(self, name: str, message: str) -> None:
        self.ctx.problem((*self.key, name), message)

    def raw(self, name: str) -> tuple[Any, bool]:
        """(value or _MISSING, whether it came from the environment as text)"""
        self.known.append(name)
        if name not in self.data:
            return _MISSING, False
        return self.data[name], (*self.key, name) in self.ctx.env_names

    def text(self, name: str, default: str, *, required: str | None = None) -> str:
        value = self.optional_text(name)
        if value is None:
            if required:
                self.problem(name, f"required: {required}")
            return default
        return value

    def optional_text(self, name: str) -> str | None:
        value, _ = self.raw(name)
        if value is _MISSING or value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(name, f"must be text, not {_kind(value)} (put it in quotes)")
            return None
        return value.strip()

    def choice(self, name: str, default: _L, choices: tuple[_L, ...], hints: Mapping[str, str] | None = None) -> _L:
        value = self.optional_text(name)
        if value is None:
            return default
        for c in choices:
            if c.lower() == value.lower():
                return c
        hint = (hints or {}).get(value.lower())
        self.problem(name, f"{value!r} is not one of {', '.join(choices)}" + (f" ({hint})" if hint else ""))
        return default

    def flag(self, name: str, default: bool) -> bool:
        value, from_env = self.raw(name)
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        self.problem(name, "must be true or false")
        return default

    def integer(self, name: str, default: int, lo: int, hi: int, why: str = "") -> int:
        value, from_env = self.raw(name)
        if value is _MISSING or value is None:
            return default
        if from_env and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, f"must be a whole number, not {_kind(value)}")
            return default
        if not lo <= value <= hi:
            self.problem(name, f"must be between {lo} and {hi}, not {value}" + (f" ({why})" if why else ""))
            return default
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value, from_env = self.raw(name)
        if value is _MISSING or value is None:
            return default
        if from_env and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(name, f"must be a number, not {_kind(value)}")
            return default
        if not lo <= value <= hi:
            self.problem(name, f"must be between {lo:g} and {hi:g}, not {value:g}")
            return default
        return float(value)

    def path(self, name: str, default: Path) -> Path:
        value = self.optional_text(name)
        return Path(value).expanduser() if value else default

    def optional_path(self, name: str) -> Path | None:
        value = self.optional_text(name)
        return Path(value).expanduser() if value else None

    def texts(self, name: str) -> list[tuple[_Key, str]]:
        """A list of strings (from the environment: comma-separated), each with its own key for problems."""
        value, from_env = self.raw(name)
        key = (*self.key, name)
        if value is _MISSING or value is None:
            return []
        if from_env and isinstance(value, str):
            return [(key, item.strip()) for item in value.split(",") if item.strip()]
        if isinstance(value, str):
            value = [value]  # a single address where a list was expected: accept it
        if not isinstance(value, list):
            self.problem(name, f"must be a list, not {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.ctx.problem((*key, f"[{i}]"), f"must be text, not {_kind(item)}")
                continue
            out.append(((*key, f"[{i}]"), item.strip()))
        return out

    def child(self, name: str) -> _Reader:
        value, _ = self.raw(name)
        return _Reader(self.ctx, (*self.key, name), None if value is _MISSING else value)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.known:
                self.problem(name, _unknown(name, self.known))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# -- the sections ----------------------------------------------------------------------------------------------
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_USERNAME = re.compile(r"^([^\\\s@]+\\[^\\\s@]+|[^@\s\\]+@[^@\s\\]+)$")
_VERSION_HINTS = {
    "exchange2019": "Exchange 2019 speaks the Exchange2016 schema: use Exchange2016",
    "exchange2010": "Exchange 2010 is not supported; the gateway needs Exchange 2013 or later",
    "exchange2010_sp2": "Exchange 2010 is not supported; the gateway needs Exchange 2013 or later",
    "exchange2015": "use Exchange2016",
}


def _build(ctx: _Context) -> Config:
    return Config(
        exchange=_exchange(ctx, ctx.section("exchange")),
        rooms=_rooms(ctx.section("rooms")),
        sync=_sync(ctx.section("sync")),
        store=_store(ctx.section("store")),
        vault=_vault(ctx, ctx.section("vault")),
        api=_api(ctx.section("api")),
        relay=_relay(ctx.section("relay")),
        commands=_commands(ctx.section("commands")),
        logging=_logging(ctx.section("logging")),
        source=ctx.file,
    )


def _exchange(ctx: _Context, r: _Reader) -> ExchangeConfig:
    d = ExchangeConfig()
    ews_url = r.optional_text("ews_url")
    autodiscover_email = r.optional_text("autodiscover_email")
    allow_http = r.flag("allow_insecure_http", d.allow_insecure_http)
    if ews_url is not None:
        parts = urlsplit(ews_url)
        if parts.scheme.lower() == "http" and not allow_http:
            r.problem("ews_url", "uses http://, which would carry the service account's credentials and every "
                                 "booking unencrypted; use https:// (exchange.allow_insecure_http: true is only "
                                 "for the local simulator)")
        elif parts.scheme.lower() not in ("https", "http") or not parts.hostname:
            r.problem("ews_url", f"{ews_url!r} is not a URL; write it like "
                                 "https://mail.contoso.com/EWS/Exchange.asmx")
    if autodiscover_email is not None and not _EMAIL.match(autodiscover_email):
        r.problem("autodiscover_email", f"{autodiscover_email!r} is not an email address")
    if ews_url is None and autodiscover_email is None:
        r.problem("ews_url", "required: the EWS endpoint, e.g. https://mail.contoso.com/EWS/Exchange.asmx "
                             "(or set exchange.autodiscover_email to find it through Autodiscover)")
    auth = r.choice("auth", d.auth, get_args(AuthMethod),
                    {"kerberos": "Kerberos is not supported yet", "oauth": "OAuth is for Exchange Online (Graph)"})
    username = r.text("username", d.username, required="the service account, as DOMAIN\\user or user@domain")
    if username and not _USERNAME.match(username):
        r.problem("username", "must be DOMAIN\\user or user@domain (a UPN); in YAML write it unquoted or in "
                              "single quotes: 'CONTOSO\\svc-gateway'")
    password_ref = d.password_ref
    value, _ = r.raw("password_ref")
    if value is not _MISSING and value is not None:
        ref = SecretRef.parse(value) if isinstance(value, str) else None
        if ref is None:  # never repeat the value: it may well be the password itself
            r.problem("password_ref", "must say where the password is kept — vault:exchange (the encrypted vault) "
                                      "or env:VARIABLE — never the password itself; store the password with "
                                      "`gateway credentials set exchange` and write password_ref: vault:exchange")
        else:
            password_ref = ref
            if ref.scheme == "env" and not ctx.env.get(ref.name):
                r.problem("password_ref", f"refers to the environment variable {ref.name}, which is not set")
    version = r.choice("version", d.version, get_args(ExchangeVersion), _VERSION_HINTS)
    ca_bundle = r.optional_path("ca_bundle")
    if ca_bundle is not None and not ca_bundle.is_file():
        r.problem("ca_bundle", f"there is no file at {ca_bundle}; give the path of a PEM file with the CA "
                               "certificates that issued Exchange's certificate")
    timeout = r.number("timeout_seconds", d.timeout_seconds, 1, 600)
    max_requests = r.integer("max_concurrent_requests", d.max_concurrent_requests, 1, 27,
                             "Exchange allows 27 concurrent EWS requests per account by default; stay at 10 or "
                             "below to leave room for other clients")
    tz = r.text("default_timezone", d.default_timezone)
    if not _is_zone(tz):
        hint = ("that is a Windows time zone name; use the IANA name, e.g. Europe/Berlin for "
                "'W. Europe Standard Time'" if "standard time" in tz.lower()
                else "use an IANA name such as Europe/Berlin, America/New_York or UTC")
        r.problem("default_timezone", f"unknown time zone {tz!r}; {hint}")
        tz = d.default_timezone
    r.finish()
    return ExchangeConfig(ews_url=ews_url, autodiscover_email=autodiscover_email, allow_insecure_http=allow_http,
                          auth=auth, username=username, password_ref=password_ref, version=version,
                          ca_bundle=ca_bundle, timeout_seconds=timeout, max_concurrent_requests=max_requests,
                          default_timezone=tz)


def _is_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return False
    return True


def _addresses(r: _Reader, name: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for key, address in r.texts(name):
        if not _EMAIL.match(address):
            r.ctx.problem(key, f"{address!r} is not an email address")
            continue
        seen.setdefault(address.lower(), None)
    return tuple(seen)


def _rooms(r: _Reader) -> RoomsConfig:
    d = RoomsConfig()
    mailboxes = _addresses(r, "mailboxes")
    room_lists = _addresses(r, "room_lists")
    if not mailboxes and not room_lists and not _has_problem_under(r, ("mailboxes", "room_lists")):
        r.problem("mailboxes", "required: list the room mailboxes to sync (or room lists under rooms.room_lists)")
    days_back = r.integer("days_back", d.days_back, 0, 366)
    days_ahead = r.integer("days_ahead", d.days_ahead, 1, 730, "Exchange expands series over at most two years")
    privacy = _privacy(r.child("privacy"))
    r.finish()
    return RoomsConfig(mailboxes=mailboxes, room_lists=room_lists, days_back=days_back, days_ahead=days_ahead,
                       privacy=privacy)


def _has_problem_under(r: _Reader, names: tuple[str, ...]) -> bool:
    prefixes = tuple(_dotted((*r.key, n)) for n in names)
    return any(p.key.startswith(prefixes) for p in r.ctx.problems)


def _policy(r: _Reader, base: PrivacyPolicy) -> PrivacyPolicy:
    return PrivacyPolicy(
        subject=r.choice("subject", base.subject, get_args(SubjectPolicy)),
        private_subject=r.text("private_subject", base.private_subject),
        hide_private_organizer=r.flag("hide_private_organizer", base.hide_private_organizer),
    )


def _privacy(r: _Reader) -> PrivacyConfig:
    default = _policy(r, PrivacyPolicy())
    rooms_reader = r.child("rooms")
    per_room: dict[str, PrivacyPolicy] = {}
    for room in list(rooms_reader.data):
        rooms_reader.known.append(room)
        if not _EMAIL.match(room):
            rooms_reader.problem(room, f"{room!r} is not a room's email address")
            continue
        room_reader = rooms_reader.child(room)
        per_room[room.lower()] = _policy(room_reader, default)
        room_reader.finish()
    r.finish()
    return PrivacyConfig(default=default, rooms=MappingProxyType(per_room))


def _sync(r: _Reader) -> SyncConfig:
    d = SyncConfig()
    cfg = SyncConfig(
        mode=r.choice("mode", d.mode, get_args(SyncMode), {"push": "push needs a listener Exchange can reach; "
                                                                   "use streaming"}),
        poll_interval_seconds=r.number("poll_interval_seconds", d.poll_interval_seconds, 5, 86400),
        debounce_seconds=r.number("debounce_seconds", d.debounce_seconds, 0, 60),
        reconcile_interval_seconds=r.number("reconcile_interval_seconds", d.reconcile_interval_seconds, 60,
                                            7 * 86400),
        streaming_connection_timeout_minutes=r.integer(
            "streaming_connection_timeout_minutes", d.streaming_connection_timeout_minutes, 1, 30,
            "EWS accepts 1 to 30 minutes"),
        group_size=r.integer("group_size", d.group_size, 1, 200,
                             "EWS streams at most 200 subscriptions per connection"),
    )
    r.finish()
    return cfg


def _store(r: _Reader) -> StoreConfig:
    cfg = StoreConfig(path=r.path("path", StoreConfig().path))
    r.finish()
    return cfg


def _vault(ctx: _Context, r: _Reader) -> VaultConfig:
    d = VaultConfig()
    path = r.path("path", d.path)
    key_file = r.path("key_file", d.key_file)
    key_env = r.optional_text("key_env")
    if key_env is not None:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key_env):
            r.problem("key_env", "must be the name of an environment variable, e.g. GATEWAY_VAULT_KEY — the "
                                 "name, not the key itself")
            key_env = None
        elif key_env.startswith(ENV_PREFIX) and "__" in key_env:
            r.problem("key_env", f"{key_env} looks like a configuration override; choose a name without '__', "
                                 "e.g. GATEWAY_VAULT_KEY")
        elif not ctx.env.get(key_env):
            r.problem("key_env", f"the environment variable {key_env} is not set; set it to the vault key")
    elif _same_file(path, key_file):
        r.problem("key_file", "must not be the vault file itself; keep the key apart from the vault")
    r.finish()
    return VaultConfig(path=path, key_file=key_file, key_env=key_env)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _api(r: _Reader) -> ApiConfig:
    d = ApiConfig()
    host = r.text("host", d.host)
    if "://" in host or "/" in host or " " in host or not (_is_ip(host) or _HOSTNAME.match(host)):
        r.problem("host", f"{host!r} is not an address to listen on; use an IP address such as 127.0.0.1 "
                          "(this machine only) or 0.0.0.0 (every interface)")
        host = d.host
    port = r.integer("port", d.port, 1, 65535)
    r.finish()
    return ApiConfig(host=host, port=port)


def _relay(r: _Reader, *, enrolling: bool = False) -> RelayConfig:
    d = RelayConfig()
    enabled = r.flag("enabled", d.enabled)
    hub_url = r.optional_text("hub_url")
    if hub_url is not None and urlsplit(hub_url).scheme not in ("wss", "https"):
        r.problem("hub_url", "must be a wss:// address (the tunnel is always TLS), e.g. wss://hub.example.com/v1/tunnel")
    if enabled and hub_url is None and not enrolling:
        r.problem("hub_url", "is required when relay.enabled is true; `gateway enroll` prints the value")
    proxy_url = r.optional_text("proxy_url")
    if proxy_url is not None and (urlsplit(proxy_url).scheme != "http" or not urlsplit(proxy_url).hostname):
        r.problem("proxy_url", "must be an http:// proxy address such as http://proxy.corp:3128 (the tunnel "
                               "inside it is TLS all the same)")
    if proxy_url is not None and urlsplit(proxy_url).password:
        r.problem("proxy_url", "must not contain a password; set proxy_username and proxy_password_ref")
    ref_text = r.optional_text("proxy_password_ref")
    ref = SecretRef.parse(ref_text) if ref_text else None
    if ref_text and ref is None:
        r.problem("proxy_password_ref", "must be vault:NAME or env:VARIABLE, never the password itself")
    cfg = RelayConfig(
        enabled=enabled, hub_url=hub_url, ca_bundle=r.optional_path("ca_bundle"), proxy_url=proxy_url,
        proxy_username=r.optional_text("proxy_username"), proxy_password_ref=ref,
        heartbeat_seconds=r.number("heartbeat_seconds", d.heartbeat_seconds, 2, 300),
        window=r.integer("window", d.window, 1, 100000),
        reconnect_max_seconds=r.number("reconnect_max_seconds", d.reconnect_max_seconds, 1, 3600),
    )
    r.finish()
    return cfg


def _commands(r: _Reader) -> CommandsConfig:
    d = CommandsConfig()
    rooms = [text.lower() for _key, text in r.texts("writable_rooms")] or list(d.writable_rooms)
    cfg = CommandsConfig(
        enabled=r.flag("enabled", d.enabled),
        writable_rooms=tuple(rooms),
        max_duration_minutes=r.integer("max_duration_minutes", d.max_duration_minutes, 5, 7 * 1440),
        rate_per_minute=r.integer("rate_per_minute", d.rate_per_minute, 1, 100000),
        burst=r.integer("burst", d.burst, 1, 100000),
        attendant_timeout_seconds=r.number("attendant_timeout_seconds", d.attendant_timeout_seconds, 1, 600),
    )
    r.finish()
    return cfg


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _logging(r: _Reader) -> LoggingConfig:
    d = LoggingConfig()
    cfg = LoggingConfig(level=r.choice("level", d.level, get_args(LogLevel), {"warn": "use warning"}),
                        format=r.choice("format", d.format, get_args(LogFormat)))
    r.finish()
    return cfg


__all__ = [
    "CONFIG_PATH_ENV",
    "ENV_PREFIX",
    "ApiConfig",
    "Config",
    "ExchangeConfig",
    "LoggingConfig",
    "PrivacyConfig",
    "PrivacyPolicy",
    "Problem",
    "RoomsConfig",
    "SecretRef",
    "StoreConfig",
    "SyncConfig",
    "VaultConfig",
    "check_config",
    "load_config",
    "load_vault_config",
]
