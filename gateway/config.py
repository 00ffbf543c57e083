"""The gateway's settings: one YAML file, overridden by ``GATEWAY_<SECTION>__<KEY>`` environment variables.

Read once at start-up into frozen, typed pydantic dataclasses and passed down; nothing else reads the file or the
environment. Every problem is reported together in one ConfigError, each with its place (``file:line: dotted.key``
or the environment variable) and what to change, so an administrator fixes the file once rather than once per
restart; ``gateway.config_reader`` keeps the places and says pydantic's errors the gateway's way.

Environment overrides: ``GATEWAY_EXCHANGE__EWS_URL=https://…`` sets ``exchange.ews_url``; a nested setting takes
one more ``__`` (``GATEWAY_ROOMS__PRIVACY__SUBJECT=hash``). Values are converted to the setting's type (numbers,
``true``/``false``, comma-separated lists); an empty value unsets. ``GATEWAY_CONFIG`` names the file.

Secrets never live here: ``exchange.password_ref`` says where the password is (``vault:exchange``, stored with
``gateway credentials set exchange``, or ``env:VARIABLE``). A password written into the file is refused, and no
problem message repeats a value that could be a secret.

Settings built in code are checked for their types; ``load_config`` also holds them to the ranges an operator may
choose and checks what they point at (files, environment variables, the hub of an enabled relay). The file's JSON
Schema, ``gateway/schemas/config.v1.json``, is generated from these models: ``gateway config-schema >
gateway/schemas/config.v1.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import dataclasses as pd
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from gateway.config_reader import CONFIG_PATH_ENV, ENV_PREFIX, Hint, Problem, SettingsReader
from gateway.errors import ConfigError
from gateway.security.secret import NAME_PATTERN
from gateway.sharding import MAX_REPLICAS, Shard, ordinal_from_name

SCHEMA_ID: Final = "https://exchange-gateway.dev/schemas/config.v1.json"

AuthMethod = Literal["ntlm", "basic"]
ExchangeVersion = Literal["Exchange2013", "Exchange2013_SP1", "Exchange2016"]
SubjectPolicy = Literal["keep", "hash", "drop"]
SyncMode = Literal["streaming", "pull", "poll"]
LogLevel = Literal["debug", "info", "warning", "error"]
OrganizerPolicy = Literal["external", "refuse"]
LogFormat = Literal["auto", "json", "console"]


# -- value types -----------------------------------------------------------------------------------------------
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

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(cls, serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "string", "pattern": cls._RE.pattern, "description": "vault:NAME or env:VARIABLE"}


def _secret_ref(entry: str) -> BeforeValidator:
    def parse(value: Any) -> Any:
        ref = SecretRef.parse(value) if isinstance(value, str) else value
        if value is not None and not isinstance(ref, SecretRef):  # never repeat it: it may be the password itself
            raise PydanticCustomError(
                "secret_ref", "must say where the password is kept — vault:{entry} (the encrypted vault) or "
                "env:VARIABLE — never the password itself; store the password with `gateway credentials set "
                "{entry}` and refer to it as vault:{entry}", {"entry": entry})
        return ref
    return BeforeValidator(parse)


def _bad(template: str, value: Any = None) -> PydanticCustomError:
    """A problem in our words; ``{value}`` in the template is the offending value, quoted."""
    return PydanticCustomError("gateway", template, {"value": repr(value)})


def _not_null(default: str | None = None) -> Callable[[dict[str, Any]], None]:
    """The JSON Schema of a setting that is given or left out (an empty value is as if left out): no null."""
    def fix(schema: dict[str, Any]) -> None:
        schema.update({**schema.pop("anyOf")[0], **schema})  # the field's own description wins
        schema.pop("default", None)
        if default is not None:
            schema["default"] = default
    return fix


def _choice(options: Any) -> BeforeValidator:
    """Choices are matched ignoring case: Streaming is streaming."""
    names = get_args(options)
    return BeforeValidator(lambda v: next((n for n in names if isinstance(v, str) and n.lower() == v.lower()), v))


def _address(what: str) -> AfterValidator:
    def check(text: str) -> str:
        if not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", text):
            raise _bad("{value} is not " + what, text)
        return text.lower()
    return AfterValidator(check)


def _zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        hint = ("that is a Windows time zone name; use the IANA name, e.g. Europe/Berlin for 'W. Europe Standard "
                "Time'" if "standard time" in name.lower() else
                "use an IANA name such as Europe/Berlin, America/New_York or UTC")
        raise _bad("unknown time zone {value}; " + hint, name) from None
    return name


def _listen_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$", host):
            raise _bad("{value} is not an address to listen on; use an IP address such as 127.0.0.1 (this machine "
                       "only) or 0.0.0.0 (every interface)", host) from None
    return host


class Range:
    """Field metadata: the bounds an operator may choose, and why (in the schema too). Settings built in code are
    not held to them: tests and benchmarks use timeouts of a tenth of a second."""

    def __init__(self, lo: float, hi: float, why: str = "") -> None:
        self.lo, self.hi, self.why = lo, hi, why

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        return {**handler(schema), "minimum": self.lo, "maximum": self.hi}

    def _check(self, value: float, info: ValidationInfo) -> float:
        if _env(info) is not None and not self.lo <= value <= self.hi:
            raise _bad(f"must be between {self.lo:g} and {self.hi:g}, not {value:g}"
                       + (f" ({self.why})" if self.why else ""))
        return value


def _env(info: ValidationInfo) -> Mapping[str, str] | None:
    """The environment load_config checks against (None: settings built in code, checked for shape only)."""
    return info.context.get("env") if isinstance(info.context, dict) else None


def _env_ref_set(ref: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
    """An env:VARIABLE reference names a variable that is set (checked by load_config only)."""
    if ref is not None and (env := _env(info)) is not None and ref.scheme == "env" and not env.get(ref.name):
        raise _bad(f"refers to the environment variable {ref.name}, which is not set")
    return ref


def _pem_file(path: Path | None, info: ValidationInfo, what: str) -> Path | None:
    """A CA bundle setting names a file (checked by load_config only); ``what``: which CA certificates it holds."""
    if path is not None and _env(info) is not None and not path.is_file():
        raise _bad(f"there is no file at {path}; give the path of a PEM file with {what}")
    return path


Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
Whole = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
FilePath = Annotated[Path, AfterValidator(Path.expanduser)]
Email = Annotated[str, Strict(), _address("an email address"), WithJsonSchema({"type": "string", "format": "email"})]
_AS_LIST = BeforeValidator(lambda v: [v] if isinstance(v, str) else v)  # one address alone is a list of one
Addresses = Annotated[tuple[Email, ...], _AS_LIST, AfterValidator(lambda t: tuple(dict.fromkeys(t)))]
RoomKey = Annotated[str, _address("a room's email address")]
_SETTINGS = ConfigDict(extra="forbid", str_strip_whitespace=True, hide_input_in_errors=True)  # it may be a secret


# -- the settings ----------------------------------------------------------------------------------------------
@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class ExchangeConfig:
    """How the gateway reaches on-premise Exchange over EWS, as its service account."""

    autodiscover_email: Email | None = Field(
        default=None, description="a mailbox to run Autodiscover for, when ews_url is not known (slower)")
    allow_insecure_http: Flag = Field(
        default=False, description="accept an http:// ews_url: only for the local simulator")
    ews_url: Text | None = Field(
        default=None, validate_default=True,
        description="the EWS endpoint, e.g. https://mail.contoso.com/EWS/Exchange.asmx (avoids Autodiscover)")
    auth: Annotated[AuthMethod, _choice(AuthMethod), Hint(
        kerberos="Kerberos is not supported yet", oauth="OAuth is for Exchange Online (Graph)")] = Field(
        default="ntlm", description="ntlm (the on-premise default) or basic (often disabled on-premise)")
    username: Text = Field(description="the service account, as DOMAIN\\user or user@domain")
    password_ref: Annotated[SecretRef | None, _secret_ref("exchange")] = Field(
        default=SecretRef("vault", "exchange"), json_schema_extra=_not_null("vault:exchange"),
        description="where the password is (vault:NAME or env:VARIABLE), never the password")
    version: Annotated[ExchangeVersion, _choice(ExchangeVersion), Hint(
        exchange2019="Exchange 2019 speaks the Exchange2016 schema: use Exchange2016",
        exchange2010="Exchange 2010 is not supported; the gateway needs Exchange 2013 or later",
        exchange2010_sp2="Exchange 2010 is not supported; the gateway needs Exchange 2013 or later",
        exchange2015="use Exchange2016")] = Field(
        default="Exchange2013_SP1", description="the EWS schema, pinned; Exchange 2019 speaks Exchange2016")
    ca_bundle: FilePath | None = Field(
        default=None, description="PEM file of CAs to trust for Exchange; TLS is verified either way")
    timeout_seconds: Annotated[Number, Range(1, 600)] = Field(
        default=60.0, description="one EWS request, connect to last byte")
    max_concurrent_requests: Annotated[Whole, Range(1, 27, "Exchange allows 27 concurrent EWS requests per "
                                                    "account by default; stay at 10 or below to leave room for other "
                                                    "clients")] = Field(
        default=8, description="EWS calls in flight for the service account")
    default_timezone: Annotated[Text, AfterValidator(_zone)] = Field(
        default="UTC", description="IANA zone for dates Exchange gives without one (all-day events)")

    @property
    def insecure(self) -> bool:
        return bool(self.ews_url and self.ews_url.lower().startswith("http://"))

    @property
    def secret_ref(self) -> SecretRef:
        """Where the service account's password is."""
        return self.password_ref or SecretRef("vault", "exchange")

    @field_validator("ews_url")
    def _ews_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:  # required, unless Autodiscover is to find it (or the autodiscover_email is itself wrong)
            if "autodiscover_email" in info.data and info.data["autodiscover_email"] is None:
                raise _bad("required: the EWS endpoint, e.g. https://mail.contoso.com/EWS/Exchange.asmx (or set "
                           "autodiscover_email to find it through Autodiscover)")
            return None
        parts = urlsplit(url)
        if parts.scheme.lower() == "http" and not info.data.get("allow_insecure_http"):
            raise _bad("uses http://, which would carry the service account's credentials and every booking "
                       "unencrypted; use https:// (exchange.allow_insecure_http: true is only for the local simulator)")
        if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
            raise _bad("{value} is not a URL; write it like https://mail.contoso.com/EWS/Exchange.asmx", url)
        return url

    @field_validator("username")
    def _username(cls, name: str) -> str:
        if not re.match(r"^([^\\\s@]+\\[^\\\s@]+|[^@\s\\]+@[^@\s\\]+)$", name):
            raise _bad("must be DOMAIN\\user or user@domain (a UPN); in YAML write it unquoted or in single quotes: "
                       "'CONTOSO\\svc-gateway'")
        return name

    @field_validator("password_ref")
    def _password_ref(cls, ref: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        return _env_ref_set(ref, info)

    @field_validator("ca_bundle")
    def _ca_bundle(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _pem_file(path, info, "the CA certificates that issued Exchange's certificate")


@pd.dataclass(frozen=True, config=_SETTINGS)
class PrivacyPolicy:
    """What of a booking leaves the building (applied before the outbox)."""

    subject: Annotated[SubjectPolicy, _choice(SubjectPolicy)] = Field(
        default="keep", description="keep, hash (a stable digest: equal subjects match) or drop")
    private_subject: Text = Field(default="Private", description="the subject shown for meetings marked private")
    hide_private_organizer: Flag = Field(
        default=True, description="private meetings leave without organizer (and attendees)")


@pd.dataclass(frozen=True, config=_SETTINGS)
class PrivacyConfig(PrivacyPolicy):
    """The default policy, and exceptions per room that inherit what they do not set."""

    rooms: Annotated[Mapping[RoomKey, PrivacyPolicy], AfterValidator(MappingProxyType)] = Field(
        default_factory=lambda: MappingProxyType({}), description="exceptions by room address")

    @property
    def default(self) -> PrivacyPolicy:
        return PrivacyPolicy(self.subject, self.private_subject, self.hide_private_organizer)

    def for_room(self, room: str) -> PrivacyPolicy:
        return self.rooms.get(room.lower(), self.default)

    @field_validator("rooms", mode="before")
    def _inherit(cls, rooms: Any, info: ValidationInfo) -> Any:
        if not isinstance(rooms, Mapping):
            return rooms
        base = {k: v for k, v in info.data.items() if k != "rooms"}
        return {room: {**base, **policy} if isinstance(policy, Mapping) else policy for room, policy in rooms.items()}


def unknown_privacy_rooms(privacy: PrivacyConfig, rooms: Iterable[str]) -> list[tuple[str, str]]:
    """(room, problem) for each per-room privacy exception that names none of ``rooms``: the room it was meant for
    would silently keep the default policy, and its subjects might leave the building."""
    known = sorted({r.lower() for r in rooms})
    out = []
    for room in privacy.rooms:
        if room not in known:
            close = _closest(room, known)
            hint = (f"did you mean '{close}'?" if close else f"the rooms are {', '.join(known)}"
                    if 0 < len(known) <= 10 else "check the address")
            out.append((room, "is not a configured room, so this exception applies to nothing and the room it was "
                              f"meant for keeps the default policy; {hint}"))
    return out


def _closest(address: str, known: list[str]) -> str | None:
    """The address meant, judged by the part before the @ among the same domain (rooms share their domain, which
    would make every address look alike), else by a nearly equal address (a misspelt domain)."""
    local, _, domain = address.partition("@")
    same = {k.partition("@")[0]: k for k in known if k.partition("@")[2] == domain}
    close = difflib.get_close_matches(local, same, n=1, cutoff=0.75)
    if close:
        return same[close[0]]
    return next(iter(difflib.get_close_matches(address, known, n=1, cutoff=0.9)), None)


@pd.dataclass(frozen=True, config=_SETTINGS)
class RoomsConfig:
    """Which room mailboxes to sync (in the single-source form) and over what window."""

    room_lists: Addresses = Field(
        default=(), description="room list (distribution group) addresses, expanded at start-up and every "
                                "sync.room_list_interval_seconds (the single-source form; with sources:, each source "
                                "lists its own)")
    mailboxes: Addresses = Field(default=(), description="room mailbox addresses (the single-source form; with "
                                                         "sources:, each source lists its own)")
    days_back: Annotated[Whole, Range(0, 366)] = Field(
        default=7, description="the sync window starts this many days before today")
    days_ahead: Annotated[Whole, Range(1, 730, "Exchange expands series over at most two years")] = Field(
        default=365, description="... and ends this many days after it")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)



SourceKind = Literal["ews"]
GraphKind = Literal["graph"]


def _source_name(name: str) -> str:
    if not re.match(r"^[a-z][a-z0-9_]{0,31}$", name):
        raise _bad("{value} is not a source name; use a short name of lowercase letters, digits and _ that starts "
                   "with a letter, e.g. onprem (it names the source in logs, /readyz, the vault entry of its password "
                   "and environment overrides such as GATEWAY_SOURCES__ONPREM__EWS_URL)", name)
    return name


@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class EwsSourceConfig(ExchangeConfig):
    """A calendar source of kind ews: an on-premise Exchange organisation, reached over EWS as its service account,
    and the rooms the gateway syncs from it. A room belongs to exactly one source."""

    name: Annotated[Text, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
                    AfterValidator(_source_name)] = Field(
        description="the source's name (lowercase letters, digits, _), e.g. onprem")
    kind: Annotated[SourceKind, _choice(SourceKind), Hint(
        exchange="write ews: on-premise Exchange over EWS")] = Field(
        description="what the source is: ews (on-premise Exchange 2013-2019 over EWS) or graph (Exchange Online)")
    password_ref: Annotated[SecretRef | None, _secret_ref("NAME")] = Field(
        default=None, json_schema_extra=_not_null(),
        description="where the service account's password is (vault:NAME or env:VARIABLE), never the password; "
                    "default vault:<the source's name>")
    room_lists: Addresses = Field(
        default=(), description="room list (distribution group) addresses, expanded at start-up and every "
                                "sync.room_list_interval_seconds")
    mailboxes: Addresses = Field(default=(), validate_default=True, description="room mailbox addresses")

    @property
    def secret_ref(self) -> SecretRef:
        return self.password_ref or SecretRef("vault", self.name)

    @field_validator("mailboxes")
    def _some_rooms(cls, mailboxes: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not mailboxes and info.data.get("room_lists") == ():  # (None: the room lists are wrong themselves)
            raise _bad("required: list the source's room mailboxes (or its room lists under room_lists)")
        return mailboxes


def _https(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise _bad("{value} is not an https:// URL; Microsoft's endpoints (and the simulator's) are HTTPS only", url)
    return url.rstrip("/")


HttpsUrl = Annotated[str, Strict(), AfterValidator(_https)]


@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class GraphPeopleConfig:
    """The tenant's people (Entra ID's users with a mailbox, rooms left out), read with /users delta and relayed as
    person events, as the directory: section relays Active Directory's; their stream is directory:<source name>."""

    drop_fields: Annotated[tuple[Text, ...], _AS_LIST, AfterValidator(lambda v: _person_fields(v))] = Field(
        default=(), description="what of a person never leaves the building (privacy): name, upn, department, "
                                "manager, title, phone")
    sync_interval_seconds: Annotated[Number, Range(10, 86400)] = Field(
        default=300.0, description="how often the people changed since the last sync are read (the delta link)")
    full_compare_interval_seconds: Annotated[Number, Range(60, 7 * 86400)] = Field(
        default=86400.0, description="how often everyone is read and compared (a fresh delta round)")


@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class GraphSourceConfig:
    """A calendar source of kind graph: the Exchange Online rooms of one Microsoft 365 tenant, read and written
    through Microsoft Graph as an app registration (client credentials; a certificate is preferred to a secret)."""

    name: Annotated[Text, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
                    AfterValidator(_source_name)] = Field(
        description="the source's name (lowercase letters, digits, _), e.g. online")
    kind: Annotated[GraphKind, _choice(GraphKind)] = Field(
        description="graph: Exchange Online through Microsoft Graph")
    tenant_id: Text = Field(description="the Microsoft 365 tenant: its id (a GUID) or a verified domain")
    client_id: Text = Field(description="the application (client) id of the gateway's app registration")
    authority_host: HttpsUrl = Field(
        default="https://login.microsoftonline.com",
        description="the Entra ID sign-in host (national clouds have their own, e.g. https://login.microsoftonline.us)")
    graph_url: HttpsUrl = Field(
        default="https://graph.microsoft.com/v1.0",
        description="the Graph root (national clouds: e.g. https://graph.microsoft.us/v1.0)")
    ca_bundle: FilePath | None = Field(
        default=None, description="PEM file of CAs to trust for Graph and the sign-in host; TLS is verified either way")
    certificate_ref: Annotated[SecretRef | None, _secret_ref("NAME")] = Field(
        default=None, json_schema_extra=_not_null(),
        description="where the app's certificate is (one PEM: private key and certificate; vault:NAME or "
                    "env:VARIABLE); preferred to client_secret_ref")
    client_secret_ref: Annotated[SecretRef | None, _secret_ref("NAME")] = Field(
        default=None, json_schema_extra=_not_null(), validate_default=True,
        description="where the app's client secret is (vault:NAME or env:VARIABLE), when no certificate is used")
    secret_expires: date | None = Field(
        default=None, json_schema_extra=_not_null(),
        description="the client secret's end date (YYYY-MM-DD, as the app registration shows it), for the alert "
                    "before it expires")
    timeout_seconds: Annotated[Number, Range(1, 600)] = Field(default=60.0, description="one Graph request")
    poll_interval_seconds: Annotated[Number, Range(5, 3600)] = Field(
        default=60.0, description="delta polling of every room while change notifications cannot arrive (no relay, "
                                  "or its tunnel down)")
    room_lists: Addresses = Field(
        default=(), description="room list addresses (Places API), expanded at start-up and every "
                                "sync.room_list_interval_seconds")
    mailboxes: Addresses = Field(default=(), validate_default=True, description="room mailbox addresses")
    people: GraphPeopleConfig | None = Field(
        default=None, json_schema_extra=_not_null(),
        description="relay the tenant's people as person events (needs User.Read.All); people: {} for the defaults")

    @property
    def secret_ref(self) -> SecretRef:
        """Where the credential is: the certificate if one is configured, else the client secret."""
        return self.certificate_ref or self.client_secret_ref or SecretRef("vault", self.name)

    @property
    def credential(self) -> str:
        return "client_secret" if self.certificate_ref is None and self.client_secret_ref is not None \
            else "certificate"

    @property
    def max_concurrent_requests(self) -> int:
        """Rooms synced at once through this source. Graph limits requests per app *and mailbox* (4 at once;
        the client keeps to 3 per mailbox), not per account as EWS does, so rooms can go side by side."""
        return 16

    @field_validator("mailboxes")
    def _some_rooms(cls, mailboxes: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not mailboxes and info.data.get("room_lists") == ():
            raise _bad("required: list the source's room mailboxes (or its room lists under room_lists)")
        return mailboxes

    @field_validator("certificate_ref", "client_secret_ref")
    def _ref_set(cls, ref: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        if ref is None and info.field_name == "client_secret_ref" and info.data.get("certificate_ref", 0) is None:
            raise _bad("required: certificate_ref (preferred) or client_secret_ref: where the app registration's "
                       "credential is")
        return _env_ref_set(ref, info)

    @field_validator("ca_bundle")
    def _ca_bundle(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _pem_file(path, info, "the CA certificates to trust")


def _source_kind(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)
    if kind is None:
        return "ews"  # (the ews settings then say that kind is required)
    return kind.lower() if isinstance(kind, str) and kind.lower() in ("ews", "graph") else None


# A source's settings, told apart by ``kind``.
SourceConfig = Annotated[
    Annotated[EwsSourceConfig, Tag("ews")] | Annotated[GraphSourceConfig, Tag("graph")],
    Discriminator(_source_kind, custom_error_type="gateway",
                  custom_error_message="kind must be ews (on-premise Exchange 2013-2019 over EWS) or graph (Exchange "
                                       "Online through Microsoft Graph)")]


@pd.dataclass(frozen=True, config=_SETTINGS)
class SyncConfig:
    """How the gateway learns that a room changed (the data always comes from a sync)."""

    mode: Annotated[SyncMode, _choice(SyncMode), Hint(
        push="push needs a listener Exchange can reach; use streaming")] = Field(
        default="streaming", description="streaming (push over a held connection), pull (subscription), poll")
    poll_interval_seconds: Annotated[Number, Range(5, 86400)] = Field(
        default=60.0, description="pull and poll: how often to ask")
    debounce_seconds: Annotated[Number, Range(0, 60)] = Field(
        default=2.0, description="wait this long after a notification; one change raises several")
    reconcile_interval_seconds: Annotated[Number, Range(60, 7 * 86400)] = Field(
        default=21600.0, description="a full re-read of each room, whatever was notified")
    room_list_interval_seconds: Annotated[Number, Range(10, 86400)] = Field(
        default=300.0, description="how often the sources' room lists are read again: a room added to a list is "
                                   "connected, a room removed is disconnected, without a restart")
    streaming_connection_timeout_minutes: Annotated[Whole, Range(1, 30, "EWS accepts 1 to 30 minutes")] = Field(
        default=5, description="EWS ConnectionTimeout; bounds how long stopping takes")
    group_size: Annotated[Whole, Range(1, 200, "EWS streams at most 200 subscriptions per connection")] = Field(
        default=200, description="rooms per streaming connection")


@pd.dataclass(frozen=True, config=_SETTINGS)
class StoreConfig:
    path: FilePath = Field(
        default=Path("data/gateway.sqlite"), description="the SQLite file: bookings, sync states, the outbox")


@pd.dataclass(frozen=True, config=_SETTINGS)
class VaultConfig:
    """The encrypted credential vault and where its key comes from."""

    path: FilePath = Field(default=Path("data/credentials.vault"), description="the encrypted file (mode 0600)")
    key_env: Text | None = Field(
        default=None, description="the environment variable that holds the key (then key_file is not used)")
    key_file: FilePath = Field(default=Path("secrets/vault.key"), validate_default=True,
                               description="created (mode 0600) by the first `gateway credentials set`")

    @field_validator("key_env")
    def _key_env(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is None:
            return None
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise _bad("must be the name of an environment variable, e.g. GATEWAY_VAULT_KEY — the name, not the "
                       "key itself")
        if name.startswith(ENV_PREFIX) and "__" in name:
            raise _bad(f"{name} looks like a configuration override; choose a name without '__', e.g. "
                       "GATEWAY_VAULT_KEY")
        if (env := _env(info)) is not None and not env.get(name):
            raise _bad(f"the environment variable {name} is not set; set it to the vault key")
        return name

    @field_validator("key_file")
    def _apart(cls, key_file: Path, info: ValidationInfo) -> Path:
        path = info.data.get("path")
        if "key_env" in info.data and info.data["key_env"] is None and path and path.resolve() == key_file.resolve():
            raise _bad("must not be the vault file itself; keep the key apart from the vault")
        return key_file


@pd.dataclass(frozen=True, config=_SETTINGS)
class ApiConfig:
    """The local HTTP API (REST + SSE, /metrics, health)."""

    host: Annotated[Text, AfterValidator(_listen_host)] = Field(
        default="127.0.0.1", description="the address to listen on: 127.0.0.1 this machine only, 0.0.0.0 every one")
    port: Annotated[Whole, Range(1, 65535)] = Field(default=8088)


@pd.dataclass(frozen=True, config=_SETTINGS)
class RelayConfig:
    """The outbound tunnel to the booking vendor's hub. Off until `gateway enroll` has run and hub_url is set."""

    enabled: Flag = False
    hub_url: Text | None = Field(default=None, validate_default=True,
                                 description="wss://hub.vendor.example/v1/tunnel (`gateway enroll` prints it)")
    ca_bundle: FilePath | None = Field(default=None, description="PEM file of CAs to trust for the hub")
    proxy_url: Text | None = Field(
        default=None, description="http://proxy.corp:3128; the tunnel goes through it with CONNECT")
    proxy_username: Text | None = None
    proxy_password_ref: Annotated[SecretRef | None, _secret_ref("proxy")] = None
    heartbeat_seconds: Annotated[Number, Range(2, 300)] = Field(
        default=20.0, description="WebSocket ping interval; a peer silent for two is dropped")
    window: Annotated[Whole, Range(1, 100000)] = Field(
        default=2000, description="events in flight without an acknowledgement")
    reconnect_max_seconds: Annotated[Number, Range(1, 3600)] = Field(
        default=60.0, description="the cap of the reconnect back-off")

    @field_validator("hub_url")
    def _hub_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:  # enrolling is what yields it; settings built in code may dial a hub they name elsewhere
            if info.data.get("enabled") and _env(info) is not None and not (info.context or {}).get("enrolling"):
                raise _bad("is required when relay.enabled is true; `gateway enroll` prints the value")
        elif urlsplit(url).scheme not in ("wss", "https"):
            raise _bad("must be a wss:// address (the tunnel is always TLS), e.g. wss://hub.example.com/v1/tunnel")
        return url

    @field_validator("proxy_url")
    def _proxy_url(cls, url: str | None) -> str | None:
        if url is not None and (urlsplit(url).scheme != "http" or not urlsplit(url).hostname):
            raise _bad("must be an http:// proxy address such as http://proxy.corp:3128 (the tunnel inside it is "
                       "TLS all the same)")
        if url is not None and urlsplit(url).password:
            raise _bad("must not contain a password; set proxy_username and proxy_password_ref")
        return url


@pd.dataclass(frozen=True, config=_SETTINGS)
class CommandsConfig:
    """What the cloud (and local API clients with the book scope) may write into Exchange."""

    enabled: Flag = True
    writable_rooms: Annotated[tuple[Text, ...], _AS_LIST,
                              AfterValidator(lambda t: tuple(r.lower() for r in t) or ("*",))] = Field(
        default=("*",), description="room addresses, or \"*\" for every synced room")
    max_duration_minutes: Annotated[Whole, Range(5, 7 * 1440)] = Field(
        default=1440, description="the longest booking a command may make")
    rate_per_minute: Annotated[Whole, Range(1, 100000)] = Field(
        default=120, description="commands per minute over all clients")
    burst: Annotated[Whole, Range(1, 100000)] = Field(default=30, description="commands at once above the rate")
    attendant_timeout_seconds: Annotated[Number, Range(1, 600)] = Field(
        default=30.0, description="how long a create or move waits for the room's booking attendant")
    # The organizer of a create, looked up in the directory (only when a directory: section is configured).
    unknown_organizer: OrganizerPolicy = Field(
        default="external", description="an organizer the directory does not know: booked in the room's calendar "
        "with them as booker (external), or refused")
    disabled_organizer: OrganizerPolicy = Field(
        default="refuse", description="an organizer whose account is disabled: refused, or booked in the room's "
        "calendar with them as booker (external)")
    booking_group: Text | None = Field(
        default=None, description="a group's DN or address: only its members (nested groups too) may book through "
        "the cloud; absent: anyone")


def _warn_days(days: tuple[int, ...]) -> tuple[int, ...]:
    if not days or any(not 1 <= d <= 365 for d in days):
        raise _bad("must list days ahead between 1 and 365, e.g. [30, 7, 1]")
    return tuple(sorted(set(days), reverse=True))


@pd.dataclass(frozen=True, config=_SETTINGS)
class CredentialsConfig:
    """When the gateway checks its credentials' end dates (passwords, secrets, certificates, the relay key) and how
    far ahead it warns; and how soon it picks up a secret changed with `gateway credentials set`."""

    check_interval_seconds: Annotated[Number, Range(60, 86400)] = Field(
        default=3600.0, description="how often every credential's end date and lockout are checked")
    warn_days: Annotated[tuple[int, ...], BeforeValidator(lambda v: [v] if isinstance(v, int) else v),
                         AfterValidator(_warn_days)] = Field(
        default=(30, 7, 1), description="days ahead of an end date at which a warning is logged, once each")
    vault_check_seconds: Annotated[Number, Range(1, 3600)] = Field(
        default=5.0, description="how often the running gateway looks whether the vault file changed (a new secret "
                                 "is used without a restart; SIGHUP looks at once)")


@pd.dataclass(frozen=True, config=_SETTINGS)
class ReplicasConfig:
    """Several replicas sharing the rooms (a StatefulSet): each syncs the rooms that rendezvous-hash to its ordinal
    (gateway/sharding.py). With count 1 (the default) one gateway syncs every room."""

    count: Annotated[Whole, Range(1, MAX_REPLICAS)] = Field(
        default=1, description="how many replicas share the rooms (the StatefulSet's replicas)")
    ordinal: Annotated[Whole, Range(0, MAX_REPLICAS - 1)] | None = Field(
        default=None, description="this replica's ordinal; unset: from the pod's name in POD_NAME or HOSTNAME "
                                  "(gateway-2 is 2)")
    peer_url: Text | None = Field(
        default=None, description="the local API of the replica with ordinal {ordinal}, e.g. "
                                  "http://gateway-{ordinal}.gateway-headless:8088: a command for a room another "
                                  "replica owns is forwarded there (unset: refused with a pointer to its owner)")

    @field_validator("peer_url")
    def _peer_url(cls, url: str | None) -> str | None:
        if url is not None and ("{ordinal}" not in url or urlsplit(url.replace("{ordinal}", "0")).scheme not in
                                ("http", "https")):
            raise _bad("must be an http(s):// address with {ordinal} in it, e.g. "
                       "http://gateway-{ordinal}.gateway-headless:8088")
        return url

    @field_validator("ordinal")
    def _ordinal(cls, ordinal: int | None, info: ValidationInfo) -> int | None:
        count = info.data.get("count")
        if ordinal is not None and isinstance(count, int) and ordinal >= count:
            raise _bad(f"must be below replicas.count ({count}): the ordinals are 0 to {count - 1}")
        return ordinal

    def shard(self, env: Mapping[str, str]) -> Shard:
        """This replica's shard: the configured ordinal, else the one in the pod's name (POD_NAME, HOSTNAME)."""
        if self.count == 1:
            return Shard(0, 1)
        ordinal = self.ordinal
        if ordinal is None:
            for var in ("POD_NAME", "HOSTNAME"):
                if env.get(var) and (ordinal := ordinal_from_name(env[var])) is not None:
                    break
        if ordinal is None:
            raise ConfigError(f"replicas.count is {self.count} but this replica's ordinal is unknown",
                              key="replica_ordinal_unknown",
                              remedy="run it as a StatefulSet pod (POD_NAME=gateway-N), or set replicas.ordinal "
                                     "(GATEWAY_REPLICAS__ORDINAL)")
        if ordinal >= self.count:
            raise ConfigError(f"this replica's ordinal {ordinal} is not below replicas.count ({self.count})",
                              key="replica_ordinal_out_of_range",
                              remedy="set replicas.count to the StatefulSet's replicas")
        return Shard(ordinal, self.count)


@pd.dataclass(frozen=True, config=_SETTINGS)
class LoggingConfig:
    level: Annotated[LogLevel, _choice(LogLevel), Hint(warn="use warning")] = "info"
    format: Annotated[LogFormat, _choice(LogFormat)] = Field(
        default="auto", description="auto: console on a terminal, JSON lines otherwise")


PERSON_FIELDS: Final = ("name", "upn", "department", "manager", "title", "phone")  # what drop_fields may name


def _person_fields(fields: tuple[str, ...]) -> tuple[str, ...]:
    for f in fields:
        if f not in PERSON_FIELDS:
            raise _bad("{value} is not a field of a person; drop_fields may name " + ", ".join(PERSON_FIELDS), f)
    return tuple(dict.fromkeys(fields))


def _ldap_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
        raise _bad("{value} is not an LDAP URL; write ldaps://dc1.corp.example:636 (TLS) or ldap://dc1.corp.example "
                   "(StartTLS)", url)
    return url


def _ldap_filter(text: str) -> str:
    if text and not (text.startswith("(") and text.endswith(")") and text.count("(") == text.count(")")):
        raise _bad("{value} is not an LDAP filter; write it in parentheses, e.g. (department=Sales)", text)
    return text


LdapFilter = Annotated[Text, AfterValidator(_ldap_filter)]


@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class DirectoryConfig:
    """The organisation's directory: Active Directory over LDAP. Its people and rooms flow out as events; the
    gateway reads its service accounts' password expiry and lockout from it."""

    kind: Annotated[Literal["ldap"], Hint(
        graph="people from Graph come with a Graph source: set people: {} on it (sources[N].people)")] = Field(
        default="ldap", description="ldap (Active Directory)")
    name: Annotated[Text, AfterValidator(_source_name)] = Field(
        default="directory", description="names its event stream (partition key directory:NAME) and its credential")
    urls: Annotated[tuple[Annotated[Text, AfterValidator(_ldap_url)], ...], _AS_LIST] = Field(
        description="the domain controllers, tried in this order: ldaps://dc1.corp.example (TLS) or "
                    "ldap://dc1.corp.example (StartTLS)")
    bind: Text = Field(description="the account the gateway binds as: a DN, user@domain or DOMAIN\\user")
    password_ref: Annotated[SecretRef | None, _secret_ref("directory")] = Field(
        default=SecretRef("vault", "directory"), json_schema_extra=_not_null("vault:directory"),
        description="where the bind password is (vault:NAME or env:VARIABLE), never the password")
    ca_bundle: FilePath | None = Field(
        default=None, description="PEM file of the CA that signed the DCs' certificates; TLS is verified either way")
    server_name: Text | None = Field(
        default=None, description="the name in the DCs' certificates, when the URLs name the DCs otherwise")
    start_tls: Flag = Field(default=True, description="ldap:// URLs: StartTLS before the bind (AD requires TLS or "
                                                      "signing; false only for a directory that allows clear text)")
    base_dn: Text = Field(description="the domain's naming context, e.g. DC=corp,DC=example")
    people_base: Text | None = Field(default=None, description="where people are searched (default: base_dn)")
    people_filter: LdapFilter = Field(default="", description="ANDed to the people search, e.g. (department=Sales)")
    people_group: Text | None = Field(
        default=None, description="only members of this group (its DN), nested membership included")
    rooms_base: Text | None = Field(default=None, description="where room mailboxes are searched (default: base_dn)")
    rooms_filter: LdapFilter = Field(default="", description="ANDed to the room search")
    room_list: Email | None = Field(
        default=None, json_schema_extra=_not_null(),
        description="only the rooms of this room list (its address), nested lists included")
    rooms_source: Text | None = Field(
        default=None, json_schema_extra=_not_null(),
        description="the calendar source that syncs the rooms the directory finds (rooms_base, rooms_filter, "
                    "room_list): a room added in AD is connected, a room removed is dropped, without a restart")
    drop_fields: Annotated[tuple[Text, ...], _AS_LIST, AfterValidator(_person_fields)] = Field(
        default=(), description="what of a person never leaves the building (privacy): name, upn, department, "
                                "manager, title, phone")
    sync_interval_seconds: Annotated[Number, Range(10, 86400)] = Field(
        default=300.0, description="how often people and rooms changed since the last sync are read (uSNChanged)")
    full_compare_interval_seconds: Annotated[Number, Range(60, 7 * 86400)] = Field(
        default=86400.0, description="how often everyone is read and compared (this finds deleted people)")
    timeout_seconds: Annotated[Number, Range(1, 600)] = Field(default=15.0, description="one LDAP request")
    max_concurrent_requests: Annotated[Whole, Range(1, 16)] = Field(default=2, description="LDAP connections")

    @property
    def secret_ref(self) -> SecretRef:
        return self.password_ref or SecretRef("vault", "directory")

    @field_validator("password_ref")
    def _password_ref(cls, ref: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        return _env_ref_set(ref, info)

    @field_validator("ca_bundle")
    def _ca_bundle(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _pem_file(path, info, "the CA certificate that signed the domain controllers' certificates")


@pd.dataclass(frozen=True, kw_only=True, config=_SETTINGS)
class Config:
    exchange: ExchangeConfig | None = Field(
        default=None, json_schema_extra=_not_null(),
        description="the one Exchange organisation of the single-source form (or list sources:)")
    sources: tuple[SourceConfig, ...] = Field(
        default=(), description="the calendar sources, each with its own connection, credentials and rooms (instead "
                                "of exchange: and rooms.mailboxes)")
    rooms: RoomsConfig = Field(default_factory=RoomsConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    vault: VaultConfig = Field(default_factory=VaultConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    credentials: CredentialsConfig = Field(default_factory=CredentialsConfig)
    directory: DirectoryConfig | None = Field(
        default=None, json_schema_extra=_not_null(), description="Active Directory over LDAP: people, rooms, accounts")
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    source: SkipJsonSchema[Path | None] = Field(default=None, init=False)  # the file read (None: environment only)

    @property
    def calendar_sources(self) -> tuple[SourceConfig, ...]:
        """The calendar sources: those under sources:, or the one of the single-source form (exchange: and
        rooms.mailboxes / rooms.room_lists), a source named ``exchange`` of kind ews."""
        if self.sources or self.exchange is None:
            return self.sources
        ex = self.exchange
        values = {f.name: getattr(ex, f.name) for f in dataclasses.fields(ex)}
        return (EwsSourceConfig(**values, name="exchange", kind="ews", mailboxes=self.rooms.mailboxes,
                                room_lists=self.rooms.room_lists),)

    def place_of(self, source: SourceConfig) -> str:
        """Where a source's settings are written: ``exchange`` (single-source form) or ``sources[N]``."""
        return f"sources[{self.sources.index(source)}]" if source in self.sources else "exchange"

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:  # without exchange: (or sources:) or rooms:, each required setting is named
        if not isinstance(data, dict):
            return data
        return {"rooms": {}, **data} if data.get("sources") else {"exchange": {}, "rooms": {}, **data}

    @model_validator(mode="after")
    def _booking_group(self) -> Config:  # only a directory can tell who is in the group: without one, nobody is
        if self.commands.booking_group is not None and self.directory is None:
            raise ValidationError.from_exception_data("commands", [InitErrorDetails(type=_bad(
                "needs a directory: section (only the directory knows the group's members); add one, or remove "
                "booking_group to let anyone book"), loc=("commands", "booking_group"),
                input=self.commands.booking_group)])
        return self

    @field_validator("sources")
    def _apart(cls, sources: tuple[SourceConfig, ...], info: ValidationInfo) -> tuple[SourceConfig, ...]:
        if sources and info.data.get("exchange") is not None:
            raise _bad("use either exchange: (one Exchange organisation) or sources: (several), not both; move the "
                       "exchange: settings into sources: as one more item with name: exchange and kind: ews")
        problems: list[InitErrorDetails] = []
        names: dict[str, int] = {}
        owners: dict[tuple[str, str], int] = {}
        for i, s in enumerate(sources):
            if s.name in names:
                problems.append(InitErrorDetails(type=_bad(f"is the name of sources[{names[s.name]}] too; give every "
                                                           "source a name of its own"), loc=(i, "name"), input=s.name))
            names.setdefault(s.name, i)
            for field, what in (("mailboxes", "room"), ("room_lists", "room list")):
                for j, address in enumerate(getattr(s, field)):
                    first = owners.setdefault((field, address), i)
                    if first != i:
                        problems.append(InitErrorDetails(type=_bad(
                            f"{address} is listed by source '{sources[first].name}' too; a {what} belongs to exactly "
                            "one source, so remove it from one of them"), loc=(i, field, j), input=address))
        if problems:
            raise ValidationError.from_exception_data("sources", problems)
        return sources

    @field_validator("rooms", mode="wrap")
    def _rooms(cls, raw: Any, handler: Any, info: ValidationInfo) -> RoomsConfig:
        rooms: RoomsConfig = handler(raw)
        if "sources" not in info.data:  # the sources are wrong themselves: they say so
            return rooms
        sources: tuple[SourceConfig, ...] = info.data["sources"]
        problems: list[InitErrorDetails] = []
        if sources:
            for field in ("mailboxes", "room_lists"):
                if getattr(rooms, field):
                    problems.append(InitErrorDetails(type=_bad(
                        f"with sources:, each source lists its own rooms: move these to the {field} of the source "
                        f"they belong to (sources[N].{field})"), loc=(field,), input=None))
            mailboxes = [m for s in sources for m in s.mailboxes]
            lists = [m for s in sources for m in s.room_lists]
        elif not rooms.mailboxes and not rooms.room_lists:
            problems.append(InitErrorDetails(type=_bad(
                "required: list the room mailboxes to sync (or room lists under rooms.room_lists)"), loc=("mailboxes",),
                input=None))
            mailboxes, lists = [], ["(none)"]  # no rooms to check the privacy exceptions against
        else:
            mailboxes, lists = list(rooms.mailboxes), list(rooms.room_lists)
        if not lists:  # with room lists `doctor` checks the exceptions, once the lists are expanded
            privacy = raw.get("privacy") if isinstance(raw, Mapping) else None
            written = privacy.get("rooms") if isinstance(privacy, Mapping) else None
            spelt = {str(k).lower(): k for k in written} if isinstance(written, Mapping) else {}
            problems += [InitErrorDetails(type=_bad(problem), loc=("privacy", "rooms", spelt.get(room, room)),
                                          input=room) for room, problem in unknown_privacy_rooms(rooms.privacy,
                                                                                                  mailboxes)]
        if problems:
            raise ValidationError.from_exception_data("rooms", problems)
        return rooms


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file, generated from the models above."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **TypeAdapter(Config).json_schema(),
            "title": "Exchange room gateway configuration (version 1)",
            "description": "The YAML file `gateway run --config FILE` reads; see config/gateway.example.yaml. "
                           "Choices are also accepted in other letter cases."}


# -- loading ---------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Read, override and validate the settings; raise one ConfigError listing every problem found."""
    config, problems = check_config(path, env)
    if problems or config is None:
        raise _error(problems, path, env)
    return config


def check_config(path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] = os.environ) -> tuple[Config | None, tuple[Problem, ...]]:
    """Like load_config, but return the problems instead of raising (for ``gateway doctor``)."""
    reader = SettingsReader(Config, path, env, sections=_SECTIONS)
    config = None if reader.fatal else reader.validate(Config)
    if config is not None:
        object.__setattr__(config, "source", reader.file)  # not a setting: where they came from
    return (None if reader.problems else config), reader.ordered()


def load_vault_config(path: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] = os.environ) -> VaultConfig:
    """Only the vault section, so ``gateway credentials`` works while the rest of the file is still unfinished."""
    reader = SettingsReader(Config, path, env, sections=("vault",))
    vault = None if reader.fatal else reader.validate(VaultConfig, "vault")
    if reader.problems or vault is None:
        raise _error(reader.ordered(), path, env)
    return vault


def load_relay_config(path: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] = os.environ) -> tuple[VaultConfig, RelayConfig]:
    """Only the vault and relay sections, for `gateway enroll`: it runs before the rest of the file is finished and
    before relay.hub_url is known (enrolling is what yields it)."""
    reader = SettingsReader(Config, path, env, sections=("vault", "relay"))
    vault = None if reader.fatal else reader.validate(VaultConfig, "vault")
    relay = None if reader.fatal else reader.validate(RelayConfig, "relay", enrolling=True)
    if reader.problems or vault is None or relay is None:
        raise _error(reader.ordered(), path, env)
    return vault, relay


def load_local_config(path: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] = os.environ) -> tuple[StoreConfig, ApiConfig]:
    """Only the store and api sections, for `gateway api-keys`: managing keys needs no Exchange secret."""
    reader = SettingsReader(Config, path, env, sections=("store", "api"))
    store = None if reader.fatal else reader.validate(StoreConfig, "store")
    api = None if reader.fatal else reader.validate(ApiConfig, "api")
    if reader.problems or store is None or api is None:
        raise _error(reader.ordered(), path, env)
    return store, api


def _error(problems: Iterable[Problem], path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> ConfigError:
    items = list(problems)
    source = path or env.get(CONFIG_PATH_ENV)
    origin = f" ({source} and the environment)" if source else " (from the environment)"
    noun = "problem" if len(items) == 1 else "problems"
    lines = "\n".join(f"  - {p}" for p in items)
    return ConfigError(f"the configuration{origin} has {len(items)} {noun}:\n{lines}",
                       remedy="fix these, then start again")


_SECTIONS: Final = tuple(f.name for f in Config.__dataclass_fields__.values() if f.init)

__all__ = [
    "CONFIG_PATH_ENV",
    "ENV_PREFIX",
    "ApiConfig",
    "CommandsConfig",
    "Config",
    "DirectoryConfig",
    "EwsSourceConfig",
    "ExchangeConfig",
    "GraphPeopleConfig",
    "GraphSourceConfig",
    "LoggingConfig",
    "PrivacyConfig",
    "PrivacyPolicy",
    "Problem",
    "RelayConfig",
    "ReplicasConfig",
    "RoomsConfig",
    "SecretRef",
    "SourceConfig",
    "StoreConfig",
    "SyncConfig",
    "VaultConfig",
    "check_config",
    "config_schema",
    "load_config",
    "load_relay_config",
    "load_vault_config",
    "unknown_privacy_rooms",
]
