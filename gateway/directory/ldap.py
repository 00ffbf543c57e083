"""LdapDirectory: Active Directory over LDAP (ldap3), as the Directory and AccountLookup ports and the people/room
reads of the directory sync.

ldap3 is blocking: every call runs in a bounded thread pool, each worker thread with its own connection. The
connection is TLS or nothing the server accepts: LDAPS (ldaps://) or StartTLS (ldap://), the certificate verified
against the configured CA and the expected server name (a DC's certificate names the DC, not the address we dial).
Several DCs: tried in the configured order; one that cannot be reached is skipped until the next connect. Referrals
are not chased (AD returns continuation references to the realm's DNS name). Every search is paged (AD stops at
1,000 entries without it). Values are normalised here: ldap3 returns a single-valued attribute as a value on one
server and as a list on another.

A refused bind is the same answer for every request: it is recorded once and repeated to every caller without a
request until a back-off has passed (each failed bind counts towards the account's lockout threshold).
"""

from __future__ import annotations

import asyncio
import copy
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import ldap3
import structlog
from ldap3.core import exceptions as lx
from ldap3.utils.conv import escape_filter_chars

from gateway.errors import (
    AccountLocked,
    AuthError,
    ConfigError,
    GatewayError,
    MailboxNotFound,
    NotFound,
    RequestFailed,
    TlsError,
    Unreachable,
)
from gateway.model import Person
from gateway.ports import AccountStatus, RoomInfo, RoomList
from gateway.retry import Backoff
from gateway.sync.people import DirectoryPerson, DirectoryRoom

log = structlog.get_logger("gateway.directory")
T = TypeVar("T")
Scope = Literal["BASE", "LEVEL", "SUBTREE"]

# msExchRecipientTypeDetails
USER_MAILBOX, ROOM_MAILBOX, EQUIPMENT_MAILBOX, ROOM_LIST = 1, 16, 32, 268435456
ACCOUNTDISABLE, LOCKOUT = 0x2, 0x10  # userAccountControl / msDS-User-Account-Control-Computed bits
NEVER = 0x7FFFFFFFFFFFFFFF  # msDS-UserPasswordExpiryTimeComputed for "never expires" (0 too: no password policy)
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested group membership
SHOW_DELETED = "1.2.840.113556.1.4.417"  # LDAP_SERVER_SHOW_DELETED_OID: tombstones are returned too
PEOPLE = "(&(objectCategory=person)(objectClass=user)(mail=*))"
NOT_RESOURCES = f"(!(msExchRecipientTypeDetails={ROOM_MAILBOX}))(!(msExchRecipientTypeDetails={EQUIPMENT_MAILBOX}))"
ROOMS = f"(&(objectCategory=person)(objectClass=user)(mail=*)(msExchRecipientTypeDetails={ROOM_MAILBOX}))"
ROOM_LISTS = f"(&(objectClass=group)(msExchRecipientTypeDetails={ROOM_LIST}))"
PERSON_ATTRS = ["objectGUID", "distinguishedName", "mail", "displayName", "department", "manager", "userPrincipalName",
                "userAccountControl", "uSNChanged", "title", "telephoneNumber"]
ROOM_ATTRS = ["objectGUID", "mail", "displayName", "msExchResourceCapacity", "physicalDeliveryOfficeName",
              "memberOf", "userAccountControl", "uSNChanged"]
ACCOUNT_ATTRS = ["sAMAccountName", "userPrincipalName", "userAccountControl", "msDS-UserPasswordExpiryTimeComputed",
                 "msDS-User-Account-Control-Computed", "lockoutTime", "badPwdCount"]


@dataclass(frozen=True, slots=True)
class LdapSettings:
    urls: tuple[str, ...]  # ldaps://dc1.corp.example:636 or ldap://… (StartTLS); tried in order
    bind: str  # DN, UPN or DOMAIN\user
    base_dn: str  # the domain's naming context: DC=corp,DC=example
    ca_file: str | None = None  # the CA that signed the DCs' certificates (None: the system's)
    server_name: str | None = None  # the name the certificate carries, when the URL names another (an address)
    start_tls: bool = True  # for ldap:// URLs; False sends the password in clear text (refused by a hardened AD)
    people_base: str | None = None  # default: base_dn
    people_filter: str = ""  # ANDed to the people query, e.g. (department=Sales)
    people_group: str | None = None  # a group's DN: its members, nested membership included
    rooms_base: str | None = None  # default: base_dn
    rooms_filter: str = ""  # ANDed to the room query, e.g. (physicalDeliveryOfficeName=HQ*)
    room_list: str | None = None  # only the rooms of this room list (its address), nested lists included
    page_size: int = 500
    timeout_seconds: float = 15.0
    max_workers: int = 2
    auth_retry_seconds: float = 300.0  # after a refused bind: first wait before the next attempt (doubles)
    auth_max_retry_seconds: float = 3600.0


def first(entry: dict[str, Any], name: str) -> Any:
    """One attribute's value, whether ldap3 gave a value or a list (None: absent or empty)."""
    value = entry.get(name)
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value if value not in ("", b"") else None


def every(entry: dict[str, Any], name: str) -> list[Any]:
    value = entry.get(name)
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def filetime(value: Any) -> datetime | None:
    """An AD FILETIME (100 ns since 1601) as UTC; None for 0 and the "never" value."""
    if isinstance(value, datetime):
        return None if value.year >= 9999 or value.year <= 1601 else value.astimezone(UTC)
    n = int(value or 0)
    if n <= 0 or n >= NEVER:
        return None
    return datetime(1601, 1, 1, tzinfo=UTC) + timedelta(microseconds=n // 10)


def _guid(value: Any) -> str:
    if isinstance(value, bytes):
        return str(uuid.UUID(bytes_le=value))
    return str(value).strip("{}").lower()


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class LdapDirectory:
    """Implements ports.Directory and ports.AccountLookup over LDAP."""

    def __init__(self, settings: LdapSettings, password: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.urls:
            raise ConfigError("directory.urls is empty", remedy="give the LDAP URL of at least one domain controller")
        self.settings = settings
        self._password = password
        self._pool = ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="ldap")
        self._local = threading.local()
        self._connections: list[ldap3.Connection] = []
        self._lock = threading.Lock()  # one bind at a time: a refused one answers for all who wait
        self._clock = clock
        self._backoff = Backoff(base=settings.auth_retry_seconds, cap=settings.auth_max_retry_seconds,
                                floor=settings.auth_retry_seconds / 2)
        self._refused: AuthError | None = None
        self._retry_at = 0.0
        self._preferred = 0  # the DC that answered last
        self.requests = 0  # LDAP operations sent (binds, searches, pages): for benchmarks and tests
        self.binds = 0

    # -- connections ---------------------------------------------------------------------------------------------
    def _server(self, url: str) -> ldap3.Server:
        s = self.settings
        tls = VerifiedTls(s.ca_file, s.server_name)
        return ldap3.Server(url, use_ssl=url.lower().startswith("ldaps://"), tls=tls, get_info=ldap3.NONE,
                            connect_timeout=s.timeout_seconds)

    def _connect(self) -> ldap3.Connection:
        """A bound connection to the first DC that answers (the one that answered last first)."""
        with self._lock:
            if self._refused is not None and self._clock() < self._retry_at:
                raise _held(self._refused)
            urls = list(self.settings.urls)
            order = urls[self._preferred:] + urls[:self._preferred]
            failures: list[str] = []
            last: GatewayError | None = None
            for url in order:
                try:
                    conn = self._bind(url)
                except Unreachable as e:
                    if isinstance(e, TlsError):
                        raise  # the same certificate at every DC: the configuration, not the DC
                    failures.append(f"{url}: {e}")
                    last = e
                    log.warning("directory.dc_unreachable", url=url, error=str(e))
                    continue
                except AuthError as e:
                    self._refused = e
                    self._retry_at = self._clock() + self._backoff.next()
                    log.error("directory.bind_refused", bind=self.settings.bind, key=e.key,
                              retry_in_seconds=round(self._retry_at - self._clock()))
                    raise
                if self._refused is not None:
                    log.info("directory.bind_accepted", bind=self.settings.bind)
                self._refused = None
                self._backoff.reset()
                self._preferred = urls.index(url)
                return conn
            assert last is not None
            raise type(last)("no domain controller answered: " + "; ".join(failures), key=last.key)

    def _bind(self, url: str) -> ldap3.Connection:
        s = self.settings
        conn = ldap3.Connection(self._server(url), user=s.bind, password=self._password,
                                auto_bind=ldap3.AUTO_BIND_NONE, auto_referrals=False,
                                receive_timeout=max(1, int(s.timeout_seconds)),  # ldap3 packs it as an integer
                                raise_exceptions=True, read_only=True, return_empty_attributes=False)
        try:
            conn.open()
            if not url.lower().startswith("ldaps://") and s.start_tls:
                self.requests += 1
                conn.start_tls()
            self.requests += 1
            self.binds += 1
            conn.bind()
        except BaseException as e:
            _close(conn)
            raise _mapped(e, url, s) from e
        return conn

    def _conn(self) -> ldap3.Connection:
        conn: ldap3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            if conn is not None:  # dropped by the server: its socket may still be open
                with self._lock:
                    if conn in self._connections:
                        self._connections.remove(conn)
                _close(conn)
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            _close(conn)

    def _call(self, work: Callable[[ldap3.Connection], T]) -> T:
        """Run ``work`` on this thread's connection; a connection that broke is replaced once (the next DC)."""
        for attempt in (1, 2):
            conn = self._conn()
            try:
                return work(conn)
            except (lx.LDAPSocketOpenError, lx.LDAPSocketSendError, lx.LDAPSocketReceiveError,
                    lx.LDAPSocketCloseError, lx.LDAPSessionTerminatedByServerError) as e:
                self._drop()
                if attempt == 2:
                    raise _mapped(e, "", self.settings) from e
            except lx.LDAPException as e:
                raise _mapped(e, "", self.settings) from e
        raise AssertionError("unreachable")

    async def run(self, work: Callable[[ldap3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, work)

    def search(self, conn: ldap3.Connection, base: str, query: str, attrs: Sequence[str],
               scope: Scope = "SUBTREE", controls: list[tuple[str, bool, Any]] | None = None) -> list[dict[str, Any]]:
        """Every entry (paged), as attribute dictionaries with ``dn``; continuation references dropped."""
        found: list[dict[str, Any]] = []
        cookie: bytes | None = None
        while True:
            self.requests += 1
            conn.search(base, query, search_scope=scope, attributes=list(attrs), paged_size=self.settings.page_size,
                        paged_cookie=cookie, controls=controls)
            if conn.result.get("description") == "sizeLimitExceeded":  # ldap3 does not raise it: a partial answer
                what = conn.result.get("message") or "sizeLimitExceeded"
                raise lx.LDAPSizeLimitExceededResult(f"{what} (base {base})")
            for entry in conn.response or ():
                if entry.get("type") == "searchResEntry":
                    found.append({"dn": entry["dn"], **entry["attributes"]})
            control = (conn.result.get("controls") or {}).get("1.2.840.113556.1.4.319") or {}
            cookie = (control.get("value") or {}).get("cookie")
            if not cookie:
                return found

    async def close(self) -> None:
        def unbind_all() -> None:
            # the requests in flight first: one finishing later would open a connection nobody closes
            self._pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                conns, self._connections = self._connections, []
            for c in conns:
                _close(c)
        await asyncio.get_running_loop().run_in_executor(None, unbind_all)

    def set_password(self, password: str) -> None:
        """New credentials (from the vault): the next request binds with them at once."""
        with self._lock:
            self._password = password
            self._retry_at = 0.0

    # -- AccountLookup -------------------------------------------------------------------------------------------
    async def account(self, name: str) -> AccountStatus:
        def read(conn: ldap3.Connection) -> AccountStatus:
            entry = self._account_entry(conn, name)
            uac = _int(first(entry, "userAccountControl")) or 0
            computed = _int(first(entry, "msDS-User-Account-Control-Computed")) or 0
            lockout = first(entry, "lockoutTime")
            locked_at = filetime(lockout)
            locked = bool(computed & LOCKOUT) or (locked_at is not None and self._within_lockout(conn, locked_at))
            return AccountStatus(name=name,
                                 password_expires_at=filetime(first(entry, "msDS-UserPasswordExpiryTimeComputed")),
                                 locked_out=locked, disabled=bool(uac & ACCOUNTDISABLE),
                                 bad_password_count=_int(first(entry, "badPwdCount")) or 0)
        return await self.run(read)

    def _account_entry(self, conn: ldap3.Connection, name: str) -> dict[str, Any]:
        user = "(&(objectCategory=person)(objectClass=user){})"
        scope: Scope
        if "\\" in name:
            query, base, scope = (user.format(f"(sAMAccountName={escape_filter_chars(name.split(chr(92), 1)[1])})"),
                                  self.settings.base_dn, "SUBTREE")
        elif "@" in name:
            query, base, scope = (user.format(f"(userPrincipalName={escape_filter_chars(name)})"),
                                  self.settings.base_dn, "SUBTREE")
        elif "=" in name:
            query, base, scope = "(objectClass=user)", name, "BASE"
        else:
            query, base, scope = (user.format(f"(sAMAccountName={escape_filter_chars(name)})"),
                                  self.settings.base_dn, "SUBTREE")
        try:
            found = self.search(conn, base, query, ACCOUNT_ATTRS, scope)
        except lx.LDAPNoSuchObjectResult:
            found = []
        if not found:
            raise NotFound(f"the directory has no account {name}", key="account_not_found",
                           remedy="check the account's name (a DN, user@domain or DOMAIN\\user)")
        return found[0]

    def _within_lockout(self, conn: ldap3.Connection, locked_at: datetime) -> bool:
        """Whether a lockout recorded at ``locked_at`` still holds under the domain's lockoutDuration."""
        domain = self.search(conn, self.settings.base_dn, "(objectClass=*)", ["lockoutDuration"], "BASE")
        duration = first(domain[0], "lockoutDuration") if domain else None
        if isinstance(duration, timedelta):
            length = abs(duration)
        else:
            n = abs(_int(duration) or 0)
            if n == 0 or n >= NEVER:
                return True  # until an administrator unlocks it
            length = timedelta(microseconds=n // 10)
        return datetime.now(UTC) < locked_at + length

    # -- Directory -----------------------------------------------------------------------------------------------
    async def room_lists(self) -> list[RoomList]:
        def read(conn: ldap3.Connection) -> list[RoomList]:
            found = self.search(conn, self.settings.base_dn, f"(&{ROOM_LISTS}(mail=*))", ["mail", "displayName", "cn"])
            return sorted((RoomList(str(first(e, "mail")).lower(), first(e, "displayName") or first(e, "cn"))
                           for e in found), key=lambda r: r.email)
        return await self.run(read)

    def _room_list_dn(self, conn: ldap3.Connection, address: str) -> str:
        a = escape_filter_chars(address)
        found = self.search(conn, self.settings.base_dn, f"(&{ROOM_LISTS}(|(mail={a})(proxyAddresses=smtp:{a})))",
                            ["mail"])
        if not found:
            raise NotFound(f"the directory has no room list {address}", key="room_list_not_found",
                           remedy="check the room list's address (a group whose msExchRecipientTypeDetails is "
                                  f"{ROOM_LIST})")
        return str(found[0]["dn"])

    async def rooms(self, room_list: str) -> list[RoomInfo]:
        def read(conn: ldap3.Connection) -> list[RoomInfo]:
            dn = self._room_list_dn(conn, room_list)
            query = f"(&{ROOMS}(memberOf:{IN_CHAIN}:={escape_filter_chars(dn)}))"
            found = [self._room(e) for e in self.search(conn, self.settings.base_dn, query, ROOM_ATTRS)]
            return [RoomInfo(r.email, r.name, r.capacity) for r in sorted(found, key=lambda r: r.email)]
        return await self.run(read)

    async def room(self, email: str) -> RoomInfo:
        def read(conn: ldap3.Connection) -> RoomInfo:
            a = escape_filter_chars(email)
            found = self.search(conn, self.settings.base_dn, f"(&{ROOMS}(|(mail={a})(proxyAddresses=smtp:{a})))",
                                ROOM_ATTRS)
            if not found:
                raise MailboxNotFound(f"the directory has no room mailbox {email}")
            r = self._room(found[0])
            return RoomInfo(r.email, r.name, r.capacity)
        return await self.run(read)

    async def people(self, query: str) -> list[Person]:
        def read(conn: ldap3.Connection) -> list[Person]:
            q = escape_filter_chars(query)
            found = self.search(conn, self.settings.base_dn, f"(&{PEOPLE}{NOT_RESOURCES}(anr={q}))",
                                ["mail", "displayName"])
            return sorted((Person(str(first(e, "mail")).lower(), first(e, "displayName")) for e in found),
                          key=lambda p: p.email or "")
        return await self.run(read)

    async def organizer(self, email: str, group: str | None) -> tuple[bool, bool | None] | None:
        """A booking's organizer by address (mail or proxyAddresses): (enabled, a member of ``group`` (a DN or a
        group's address), nested groups included; True without a group, None if no group has that address), or None
        if no person has the address."""
        def read(conn: ldap3.Connection) -> tuple[bool, bool | None] | None:
            a = escape_filter_chars(email)
            who = f"(&{PEOPLE}{NOT_RESOURCES}(|(mail={a})(proxyAddresses=smtp:{a})))"
            found = self.search(conn, self.settings.base_dn, who, ["userAccountControl"])
            if not found:
                return None
            enabled = not (_int(first(found[0], "userAccountControl")) or 0) & ACCOUNTDISABLE
            if group is None:
                return enabled, True
            dn = group if "=" in group else self._group_dn(conn, group)
            if dn is None:
                return enabled, None
            member = self.search(conn, str(found[0]["dn"]), f"(memberOf:{IN_CHAIN}:={escape_filter_chars(dn)})",
                                 ["objectGUID"], "BASE")
            return enabled, bool(member)
        return await self.run(read)

    async def group(self, name: str) -> str | None:
        """A group's DN, named by its DN or its address (mail or proxyAddresses); None if the directory has none."""
        def read(conn: ldap3.Connection) -> str | None:
            if "=" not in name:
                return self._group_dn(conn, name)
            try:
                found = self.search(conn, name, "(objectClass=group)", ["objectGUID"], "BASE")
            except lx.LDAPNoSuchObjectResult:
                return None
            return str(found[0]["dn"]) if found else None
        return await self.run(read)

    def _group_dn(self, conn: ldap3.Connection, address: str) -> str | None:
        a = escape_filter_chars(address.lower())
        query = f"(&(objectClass=group)(|(mail={a})(proxyAddresses=smtp:{a})))"
        found = self.search(conn, self.settings.base_dn, query, ["objectGUID"])
        return str(found[0]["dn"]) if found else None

    # -- what the directory sync reads ---------------------------------------------------------------------------
    def _people_query(self, since_usn: int | None = None) -> str:
        s = self.settings
        parts = [PEOPLE, NOT_RESOURCES, s.people_filter]
        if s.people_group:
            parts.append(f"(memberOf:{IN_CHAIN}:={escape_filter_chars(s.people_group)})")
        if since_usn is not None:
            parts.append(f"(uSNChanged>={since_usn + 1})")
        return "(&" + "".join(p for p in parts if p) + ")"

    async def highest_usn(self) -> tuple[int, str]:
        """(the DC's highestCommittedUSN, the DC's identity): an incremental read from that counter sees every
        later change, on that DC (each DC counts its own)."""
        def read(conn: ldap3.Connection) -> tuple[int, str]:
            root = self.search(conn, "", "(objectClass=*)", ["highestCommittedUSN", "dsServiceName"], "BASE")
            return _int(first(root[0], "highestCommittedUSN")) or 0, str(first(root[0], "dsServiceName") or "")
        return await self.run(read)

    async def read_people(self, since_usn: int | None = None) -> list[DirectoryPerson]:
        """Everyone in scope (None), or those changed after ``since_usn``."""
        def read(conn: ldap3.Connection) -> list[DirectoryPerson]:
            base = self.settings.people_base or self.settings.base_dn
            return [self._person(e) for e in self.search(conn, base, self._people_query(since_usn), PERSON_ATTRS)]
        return await self.run(read)

    async def scope_changed(self, since_usn: int) -> bool:
        """Whether the people group (people_group) or a group nested in it changed after ``since_usn``: in AD a
        membership change is a write to the group (its ``member``), not to the person, so an incremental read of
        the people cannot see who joined or left. One request (a page of groups); the sync then compares in full."""
        group = self.settings.people_group
        if not group:
            return False

        def read(conn: ldap3.Connection) -> bool:
            g = escape_filter_chars(group)
            query = (f"(&(objectClass=group)(|(distinguishedName={g})(memberOf:{IN_CHAIN}:={g}))"
                     f"(uSNChanged>={since_usn + 1}))")
            return bool(self.search(conn, self.settings.base_dn, query, ["objectGUID"]))
        return await self.run(read)

    async def read_deleted(self, since_usn: int) -> list[str]:
        """The ids of the users deleted after ``since_usn`` (their tombstones in Deleted Objects). Only an account
        allowed to list Deleted Objects sees them (AD grants it to administrators; others see none, and the full
        comparison finds the deleted instead)."""
        def read(conn: ldap3.Connection) -> list[str]:
            found = self.search(conn, self.settings.base_dn,
                                f"(&(isDeleted=TRUE)(objectClass=user)(uSNChanged>={since_usn + 1}))", ["objectGUID"],
                                controls=[(SHOW_DELETED, True, None)])
            return [_guid(first(e, "objectGUID")) for e in found]
        return await self.run(read)

    async def read_rooms(self) -> list[DirectoryRoom]:
        """Every room mailbox in scope (rooms_base, rooms_filter, room_list)."""
        def read(conn: ldap3.Connection) -> list[DirectoryRoom]:
            s = self.settings
            member = ""
            if s.room_list:
                member = f"(memberOf:{IN_CHAIN}:={escape_filter_chars(self._room_list_dn(conn, s.room_list))})"
            query = f"(&{ROOMS}{s.rooms_filter}{member})"
            return [self._room(e) for e in self.search(conn, s.rooms_base or s.base_dn, query, ROOM_ATTRS)]
        return await self.run(read)

    async def room_list_rooms(self, room_list: str) -> list[DirectoryRoom]:
        """The rooms of a room list, nested lists included."""
        def read(conn: ldap3.Connection) -> list[DirectoryRoom]:
            dn = self._room_list_dn(conn, room_list)
            query = f"(&{ROOMS}(memberOf:{IN_CHAIN}:={escape_filter_chars(dn)}))"
            return [self._room(e) for e in self.search(conn, self.settings.base_dn, query, ROOM_ATTRS)]
        return await self.run(read)

    @staticmethod
    def _person(e: dict[str, Any]) -> DirectoryPerson:
        uac = _int(first(e, "userAccountControl")) or 0
        return DirectoryPerson(id=_guid(first(e, "objectGUID")), email=str(first(e, "mail")).lower(),
                               name=first(e, "displayName"), upn=first(e, "userPrincipalName"),
                               department=first(e, "department"), manager=first(e, "manager"),
                               enabled=not uac & ACCOUNTDISABLE, dn=str(e["dn"]), title=first(e, "title"),
                               phone=first(e, "telephoneNumber"), usn=_int(first(e, "uSNChanged")) or 0)

    @staticmethod
    def _room(e: dict[str, Any]) -> DirectoryRoom:
        return DirectoryRoom(id=_guid(first(e, "objectGUID")), email=str(first(e, "mail")).lower(),
                             name=first(e, "displayName"), capacity=_int(first(e, "msExchResourceCapacity")),
                             location=first(e, "physicalDeliveryOfficeName"),
                             room_lists=tuple(str(g) for g in every(e, "memberOf")),
                             usn=_int(first(e, "uSNChanged")) or 0)


class VerifiedTls(ldap3.Tls):
    """TLS as Python's ssl module verifies it: the chain against the CA, the name by the standard rules (ldap3's own
    name check uses the deprecated ssl.match_hostname and leaks the socket when a name does not match)."""

    def __init__(self, ca_file: str | None, server_name: str | None) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self.server_name = server_name

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        raw = connection.socket
        try:
            connection.socket = context.wrap_socket(raw, server_hostname=self.server_name or connection.server.host,
                                                    do_handshake_on_connect=True)
        except BaseException:
            raw.close()
            raise


def _held(failure: AuthError) -> AuthError:
    """A copy of the recorded refusal for a caller that made no request (no traceback shared between threads)."""
    e = copy.copy(failure)
    e.__traceback__ = None
    return e


def _mapped(e: BaseException, url: str, s: LdapSettings) -> GatewayError:
    """ldap3's exceptions into the gateway's tree, with what to do about each."""
    where = f" ({url})" if url else ""
    if isinstance(e, GatewayError):
        return e
    text = str(e)
    if isinstance(e, lx.LDAPStrongerAuthRequiredResult) or "strongerAuthRequired" in text:
        return AuthError(f"the directory refused a bind without TLS{where}: {text}", key="tls_required",
                         remedy="use an ldaps:// URL or StartTLS (directory.start_tls: true); Active Directory "
                                "requires signing or TLS for simple binds")
    if isinstance(e, lx.LDAPInvalidCredentialsResult) or "invalidCredentials" in text:
        data = _ad_data(text)
        if data in ("775",):
            return AccountLocked(f"the directory has locked out {s.bind}{where}",
                                 remedy="unlock the bind account in Active Directory and check its password")
        reasons = {"532": "its password has expired", "533": "it is disabled", "701": "it has expired",
                   "773": "its password must be changed"}
        reason = reasons.get(data or "", "wrong user name or password")
        return AuthError(f"the directory refused the bind as {s.bind}{where}: {reason}",
                         remedy="check directory.bind and the password (`gateway credentials set directory`)")
    if isinstance(e, lx.LDAPSocketOpenError | lx.LDAPStartTLSError) and ("certificate" in text.lower()
                                                                           or "ssl" in text.lower()):
        return TlsError(f"TLS with the directory failed{where}: {text}",
                        remedy="check directory.ca_bundle (the CA that signed the DC's certificate) and "
                               "directory.server_name (the name in its certificate)")
    if isinstance(e, lx.LDAPSocketOpenError | lx.LDAPSocketSendError | lx.LDAPSocketReceiveError
                  | lx.LDAPSocketCloseError | lx.LDAPSessionTerminatedByServerError | OSError):
        return Unreachable(f"the directory cannot be reached{where}: {text}",
                           remedy="check that the domain controller is up, the URL in directory.urls and the firewall")
    if isinstance(e, lx.LDAPSizeLimitExceededResult):
        return RequestFailed(f"the directory stopped a search at its size limit{where}: {text}",
                             remedy="the server does not page this search; narrow the base or the filter")
    return RequestFailed(f"the directory refused a request{where}: {text}", key="directory_error",
                         remedy="see the message; check the base DNs and filters in the configuration")


def _ad_data(text: str) -> str | None:
    """The sub-code in AD's bind diagnostic ("80090308: LdapErr: … data 52e, v…")."""
    marker = "data "
    i = text.find(marker)
    return text[i + len(marker):].split(",")[0].strip() if i >= 0 else None


def _close(conn: ldap3.Connection) -> None:
    """Unbind and close the socket whatever state the connection is in (ldap3's unbind leaves the socket open when
    sending the unbind fails, and does nothing for a connection it already marked closed)."""
    try:
        conn.unbind()
    except Exception:  # a dead socket: nothing to say goodbye on
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
