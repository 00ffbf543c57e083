"""EwsSource: room calendars through EWS with exchangelib, which blocks, so it runs in a bounded thread pool.

- One exchangelib Configuration (so one pooled HTTP session set) for the service account, FailFast: the
  gateway, not exchangelib, decides when to retry, and one throttled room does not put every thread to sleep.
- When Exchange answers ErrorServerBusy, every call of this source waits out its BackOffMilliseconds.
- Every call passes the account's outage gate (sources/outage.py): refused credentials or an unreachable server
  cost one request, not one per room.
- exchangelib reports a refused connection, a 503 and a closed connection alike as ErrorServerBusy; the gateway
  tells them apart (cannot_connect, unknown_host, tls_error, http_error, throttled) from the cause chain and the
  HTTP status, so that throttling is only ever what Exchange says it is.
- A CalendarView never spans more than ``chunk_days`` and is split further while a chunk comes back full (or the
  server says it left items out), so no request exceeds EWSFindCountLimit (1000) and busy rooms never silently
  lose bookings.
- The reads (GetFolder, FindItem, GetItem, SyncFolderItems) go over the wire without exchangelib's service
  machinery (wire.py): the same requests, sessions and errors, at a fraction of the CPU. Writes, subscriptions and
  streams use exchangelib's services.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import structlog
from exchangelib import (
    BASIC,
    IMPERSONATION,
    NTLM,
    Account,
    Build,
    Configuration,
    Credentials,
    EWSDateTime,
    EWSTimeZone,
    FailFast,
    Version,
)
from exchangelib import errors as xerr
from exchangelib.folders import Calendar, Root
from exchangelib.properties import DistinguishedFolderId, Mailbox
from exchangelib.protocol import Protocol
from exchangelib.services import FindItem, GetItem
from exchangelib.util import is_xml

from gateway.errors import (
    AccessDenied,
    AccountLocked,
    AuthError,
    GatewayError,
    HttpError,
    ImpersonationDenied,
    MailboxNotFound,
    NotFound,
    ProtocolError,
    RequestFailed,
    SyncStateInvalid,
    Throttled,
    TlsError,
    TransientError,
    UnknownHost,
    Unreachable,
)
from gateway.model import Booking, Window
from gateway.ports import Changes, RoomInfo
from gateway.sources.ews import patches
from gateway.sources.ews.mapping import (
    DETAIL_FIELDS,
    SYNC_FIELDS,
    VIEW_FIELDS,
    booking_from_xml,
    bookings_from_xml,
    element_uid,
    item_id,
    register_properties,
)
from gateway.sources.ews.metrics import CallCounter
from gateway.sources.ews.series import SeriesExpander
from gateway.sources.ews.wire import Wire
from gateway.sources.outage import OutageGate

log = structlog.get_logger("gateway.sources.ews")
T = TypeVar("T")

FIND_COUNT_LIMIT = 1000
# What the mapping reads from a meeting's GetItem (its identity, whether the gateway wrote it, who is in it); the
# rest of a booking comes from its CalendarView element, so the details do not carry it twice.
MEETING_FIELDS = ("clean_global_object_id", "gateway_command_key", *DETAIL_FIELDS)
_TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
BUILDS = {"Exchange2013": Build(15, 0, 516), "Exchange2013_SP1": Build(15, 0, 847),
          "Exchange2016": Build(15, 1, 225)}


@dataclass(frozen=True)
class EwsSettings:
    ews_url: str
    username: str
    auth: str = "ntlm"  # ntlm or basic
    version: str = "Exchange2013_SP1"
    ca_bundle: str | None = None
    timeout: float = 60.0
    max_workers: int = 8  # concurrent EWS requests (Exchange's budget is 27; keep well below)
    default_timezone: str = "UTC"
    chunk_days: int = 400  # one CalendarView for the usual window; split only when a piece comes back full
    sync_page_size: int = 512
    get_item_chunk: int = 100
    # The outage gate: after a shared failure one call probes again after this back-off, doubling up to the max.
    outage_retry_seconds: float = 5.0
    outage_max_retry_seconds: float = 60.0
    auth_retry_seconds: float = 300.0  # refused credentials: each probe is a failed logon (lockout threshold)
    auth_max_retry_seconds: float = 3600.0


patches.install()


class HttpStatusError(xerr.TransportError):
    """The EWS endpoint answered an HTTP error status (exchangelib would call a 503 or a closed connection
    throttling, and a 404 an 'unknown failure')."""

    def __init__(self, status: int, reason: str, url: str, location: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}".strip() + f" from {url}")
        self.status = status
        self.reason = reason
        self.url = url
        self.location = location


class _FailFast(FailFast):
    """exchangelib's FailFast, with an HTTP error status reported as itself."""

    def raise_response_errors(self, response: Any) -> None:
        status = response.status_code
        if status == 200 or (status == 500 and response.content and is_xml(response.content)):
            return  # a SOAP answer (a fault comes with HTTP 500): exchangelib reads the EWS error from it
        if response.headers.get("X-CasErrorCode"):
            super().raise_response_errors(response)
        if b"The referenced account is currently locked out" in (response.content or b""):
            raise xerr.UnauthorizedError("The referenced account is currently locked out")
        if status == 401:
            raise xerr.UnauthorizedError(f"Invalid credentials for {response.url}")
        raise HttpStatusError(status, response.reason or "", response.url, response.headers.get("location", ""))


_HTTP_REMEDIES = {
    404: "check exchange.ews_url: the path of EWS is /EWS/Exchange.asmx on the Client Access server",
    405: "check exchange.ews_url: it must name the EWS endpoint (/EWS/Exchange.asmx), not a web page",
    403: "check that EWS is enabled for the service account (Set-CASMailbox -EwsEnabled) and that nothing "
         "between the gateway and Exchange blocks it",
}


def _causes(e: BaseException) -> list[BaseException]:
    """The exception and what caused it, outermost first (exchangelib re-raises transport failures as its own)."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _connection_failure(e: BaseException, host: str) -> Unreachable | None:
    """An Unreachable when a transport failure is anywhere in the cause chain: exchangelib re-raises a refused
    connection as ErrorTimeoutExpired or ErrorServerBusy, so the original is found by walking the chain."""
    chain = _causes(e)
    where = host or "the server"
    for c in chain:
        if isinstance(c, HttpStatusError):
            detail = f" (redirected to {c.location})" if c.location else ""
            remedy = _HTTP_REMEDIES.get(c.status) or (
                "set exchange.ews_url to the address EWS redirects to" if c.location else
                "Exchange's EWS application failed: check the server (IIS, the MSExchangeServicesAppPool) "
                "and its event log" if c.status >= 500 else
                "check exchange.ews_url and what answers there")
            return HttpError(f"{where} answered HTTP {c.status} {c.reason}".rstrip()
                             + f" for {urlsplit(c.url).path or '/'}{detail}", remedy=remedy, host=host,
                             status=c.status)
    tls: list[BaseException] = [c for c in chain if isinstance(c, ssl.SSLError)] or [
        c for c in chain if isinstance(c, requests.exceptions.SSLError)]
    if tls:
        cause = tls[-1]  # the innermost says it best ("certificate verify failed: self-signed certificate")
        why = (cause.verify_message if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message
               else getattr(cause, "reason", None) or str(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = f"certificate verify failed: {why}"
        return TlsError(f"TLS with {where} failed: {_short(str(why))}", host=host,
                        remedy="check the server's certificate, or give the CA that issued it in exchange.ca_bundle")
    names = {type(c).__name__ for c in chain}
    if any(isinstance(c, socket.gaierror) for c in chain) or "NameResolutionError" in names:
        return UnknownHost(f"the host name {where.rsplit(':', 1)[0]} cannot be resolved", host=host,
                           remedy="check the host name in exchange.ews_url and the gateway's DNS")
    if any(isinstance(c, requests.exceptions.ReadTimeout) for c in chain):
        return None  # connected, but this request took too long: not the endpoint as a whole
    connect = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError,
               socket.timeout)
    if not any(isinstance(c, connect) for c in chain):
        return None
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        why = "the connection was refused (nothing listens on that port)"
    elif any(isinstance(c, requests.exceptions.Timeout | TimeoutError | socket.timeout) for c in chain) \
            or "ConnectTimeoutError" in names:
        why = "the connection timed out"
    elif any(isinstance(c, ConnectionResetError) for c in chain):
        why = "the connection was reset"
    else:
        why = f"the connection failed ({_short(str(chain[-1]))})"
    return Unreachable(f"cannot connect to {where}: {why}", host=host,
                       remedy="check that Exchange is up, that exchange.ews_url names the right host and port, "
                              "and that a firewall lets the gateway through")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def translate(e: BaseException, room: str | None = None, endpoint: str = "") -> GatewayError | None:
    """The gateway's error for an exchangelib or requests exception (None: not one of theirs, leave it be)."""
    where = f" for {room}" if room else ""
    host = urlsplit(endpoint).netloc if endpoint else ""
    if isinstance(e, GatewayError):
        return e
    if not isinstance(e, xerr.EWSError | requests.RequestException | OSError):
        return None
    down = _connection_failure(e, host)
    if down is not None:
        return down
    if isinstance(e, xerr.ErrorServerBusy):
        wait = f" for {e.back_off:g} s" if e.back_off else ""
        return Throttled(f"Exchange asked the service account to back off{wait} (ErrorServerBusy)",
                         back_off=e.back_off,
                         remedy="nothing to do: syncs resume after the back-off; if it persists, raise the "
                                "service account's EWS throttling budget (New-ThrottlingPolicy)")
    if isinstance(e, xerr.ErrorImpersonateUserDenied):
        return ImpersonationDenied(f"the service account may not impersonate {room}")
    if isinstance(e, xerr.ErrorNonExistentMailbox | xerr.ErrorMailRecipientNotFound | xerr.ErrorInvalidSmtpAddress
                  | xerr.ErrorNameResolutionNoMailbox) or (room and isinstance(e, xerr.ErrorNameResolutionNoResults)):
        return MailboxNotFound(f"Exchange has no mailbox {room}")
    if isinstance(e, xerr.UnauthorizedError):
        if "locked out" in str(e):
            return AccountLocked(f"Exchange says the service account is locked out{where}")
        # The account's own logon failed: the plain AuthError (key invalid_auth), the same for every room.
        return AuthError(f"Exchange at {host or 'the server'} refused the service account's credentials",
                         remedy="check the account and run `gateway credentials set exchange`")
    if isinstance(e, xerr.ErrorAccessDenied):
        return AccessDenied(f"Exchange refused the service account{where}: {e}")
    if isinstance(e, xerr.ErrorInvalidSyncStateData | xerr.ErrorSyncFolderNotFound):
        return SyncStateInvalid(f"Exchange rejected the sync state{where}")
    if isinstance(e, xerr.ErrorItemNotFound | xerr.ErrorFolderNotFound):
        return NotFound(f"{e}{where}")
    if isinstance(e, xerr.ErrorCalendarViewRangeTooBig):
        return ProtocolError(f"calendar view too large{where}")
    if isinstance(e, xerr.RedirectError | xerr.MalformedResponseError) or (
            isinstance(e, xerr.SOAPError) and str(e).startswith("Bad SOAP response")):
        # Not an EWS answer at all: the URL names something else (a web page, a proxy's error page). A SOAP fault
        # with a code exchangelib does not know is an answer, though, for this request only (below).
        return HttpError(f"{host or 'the server'} did not answer as Exchange Web Services: {_short(str(e))}",
                         host=host, remedy="check exchange.ews_url: it must name https://<your CAS>/EWS/Exchange.asmx")
    cut = next((c for c in _causes(e) if isinstance(c, requests.exceptions.ChunkedEncodingError)), None)
    if cut is not None:  # (exchangelib calls it ErrorTimeoutExpired: Exchange did answer, the answer did not arrive)
        return RequestFailed(f"the connection to {host or 'Exchange'} broke while Exchange answered{where}: "
                             f"{_short(str(cut))}",
                             remedy="retried automatically; if it persists, check what lies between the gateway and "
                                    "Exchange (a proxy or load balancer that cuts long answers off or times them out)")
    if isinstance(e, xerr.ErrorTimeoutExpired | xerr.ErrorMailboxStoreUnavailable | xerr.ErrorMailboxMoveInProgress
                  | xerr.ErrorInternalServerTransientError | xerr.RateLimitError
                  | xerr.ErrorExceededConnectionCount):
        return RequestFailed(f"Exchange answered {type(e).__name__}{where}: {_short(str(e))}",
                             remedy="retried automatically; if it persists, check the mailbox server's health")
    if isinstance(e, requests.RequestException | OSError):
        return RequestFailed(f"the request to Exchange failed{where}: {_short(str(e))}")
    return TransientError(f"Exchange answered {type(e).__name__}{where}: {_short(str(e))}", key="exchange_error",
                          remedy="retried automatically; if it persists, check the mailbox server's health")


@contextlib.contextmanager
def map_ews_errors(room: str | None = None, endpoint: str = "") -> Iterator[None]:
    """Translate exchangelib and requests exceptions into the gateway's error tree."""
    try:
        yield
    except Exception as e:
        mapped = translate(e, room, endpoint)
        if mapped is None or mapped is e:
            raise
        raise mapped from e


class _RawFindItem(FindItem):
    """FindItem through exchangelib's transport, handing back the item elements unparsed (the writer's lookups)."""

    def _elem_to_obj(self, elem: Any) -> Any:
        return elem


class _RawGetItem(GetItem):
    def _elem_to_obj(self, elem: Any) -> Any:
        return elem


class EwsSource:
    """A CalendarSource for on-premise Exchange 2013-2019."""

    def __init__(self, settings: EwsSettings, password: str, *, calls: CallCounter | None = None) -> None:
        register_properties()
        self.settings = settings
        self.calls = calls or CallCounter()  # this source's EWS requests (its pool's threads report to it)
        if settings.ca_bundle:
            patches.trust(settings.ews_url, settings.ca_bundle)
        self._connections = settings.max_workers  # grown by make_room_for_streams as streams open
        self.config = self._configuration(password)
        self.tz = EWSTimeZone(settings.default_timezone)
        self._pool = ThreadPoolExecutor(settings.max_workers, thread_name_prefix="ews", initializer=self.bind_calls)
        self._accounts: dict[str, Account] = {}
        self._lock = threading.Lock()
        self._gate_until = 0.0
        self._series = SeriesExpander(settings.default_timezone)  # for servers whose CalendarView returns masters
        self._wire = Wire()  # the read requests, without exchangelib's service machinery
        self.gate = OutageGate(retry_seconds=settings.outage_retry_seconds,
                               max_retry_seconds=settings.outage_max_retry_seconds,
                               auth_retry_seconds=settings.auth_retry_seconds,
                               auth_max_retry_seconds=settings.auth_max_retry_seconds)

    def _configuration(self, password: str) -> Configuration:
        s = self.settings
        config = Configuration(
            service_endpoint=s.ews_url,
            credentials=Credentials(s.username, password),
            auth_type=BASIC if s.auth == "basic" else NTLM,
            version=Version(build=BUILDS.get(s.version, BUILDS["Exchange2013_SP1"]), api_version=s.version),
            retry_policy=_FailFast(),
            max_connections=self._connections,
        )
        Protocol(config=config).TIMEOUT = int(s.timeout)  # this endpoint's, not every client's
        return config

    def make_room_for_streams(self, streams: int) -> None:
        """An open stream holds one of exchangelib's pooled sessions for its whole life, and a request that finds the
        pool exhausted waits for a session forever: grow the pool so that ``streams`` streams and every worker fit.
        Room lists are only read at start, so the pool cannot be sized when the source is built."""
        want = self.settings.max_workers + streams + 1
        with self._lock:
            if want <= self._connections:
                return
            self._connections = want
            config = self.config
        Protocol(config=config).max_connections = want  # exchangelib adds sessions lazily up to this
        log.info("ews.session_pool_grown", connections=want, streams=streams)

    def set_password(self, password: str) -> None:
        """New credentials (re-read from the vault): a fresh configuration and accounts, and the next call probes
        at once. Streams opened with the old ones end on their own."""
        old = self.config
        with self._lock:
            self.config = self._configuration(password)
            self._accounts.clear()
        with contextlib.suppress(Exception):
            Protocol(config=old).close()
        log.info("exchange.credentials_changed")
        self.gate.retry_now()

    # -- plumbing --------------------------------------------------------------------------------------------
    def account(self, room: str) -> Account:
        room = room.lower()
        with self._lock:
            acct = self._accounts.get(room)
            if acct is None:
                acct = Account(room, config=self.config, access_type=IMPERSONATION, autodiscover=False,
                               default_timezone=self.tz)
                self._accounts[room] = acct
            return acct

    def calendar(self, room: str) -> Calendar:
        """The room's calendar addressed as Exchange names it (DistinguishedFolderId "calendar" of the mailbox), for
        reads and subscriptions: exchangelib's ``account.calendar`` first asks GetFolder and builds a folder object
        from the answer, a call and a tenth of an import's CPU per room for an id that is known beforehand."""
        acct = self.account(room)
        return Calendar(root=Root(account=acct), _distinguished_id=DistinguishedFolderId(
            id="calendar", mailbox=Mailbox(email_address=acct.primary_smtp_address)))

    def subscribe_streaming(self, room: str) -> str | None:
        """Blocking (call it inside ``guarded``): a streaming subscription to the room's calendar, its id; the
        account's affinity cookie is the one the answer set (sources/ews/wire.py)."""
        return self._wire.subscribe_streaming(self.account(room))

    @contextlib.contextmanager
    def guarded(self, room: str | None) -> Iterator[None]:
        """Blocking work for one mailbox (or none), through the outage gate, its errors mapped. Use it in a thread
        of this source (``run`` does); the feeds use it for their subscriptions."""
        since = self.gate.outages
        probe = self.gate.admit()
        try:
            with map_ews_errors(room, self.settings.ews_url):
                yield
        except BaseException as e:
            self.gate.record(probe, e, since)
            raise
        self.gate.record(probe, None, since)

    def bind_calls(self) -> None:
        """Count the EWS requests the calling thread makes as this source's (for threads outside its pool)."""
        patches.bind_calls(self.calls)

    async def _run(self, room: str | None, fn: Callable[[], T]) -> T:
        wait = self._gate_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

        def call() -> T:
            with self.guarded(room):
                return fn()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except Throttled as e:
            self._gate_until = max(self._gate_until, time.monotonic() + (e.back_off or 5.0))
            raise

    async def run(self, mailbox: str | None, fn: Callable[[], T]) -> T:
        """Run blocking exchangelib work in this source's pool, its errors mapped (sources/ews/writer.py)."""
        return await self._run(mailbox, fn)

    def ews_datetime(self, value: datetime) -> EWSDateTime:
        """An aware datetime as exchangelib wants it, in the configured default time zone."""
        return self._ews(value)

    def calendar_view(self, room: str, start: datetime, end: datetime,
                      fields: tuple[str, ...] = VIEW_FIELDS) -> list[tuple[str, Any]]:
        """Blocking (call it inside ``run``): (meeting UID, t:CalendarItem element) of the room's instances
        overlapping [start, end), occurrences expanded."""
        return self._view(room, start, end, fields)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            Protocol(config=self.config).close()

    # -- CalendarSource --------------------------------------------------------------------------------------
    async def verify(self, room: str) -> RoomInfo:
        def check() -> RoomInfo:
            for answer in self._wire.get_folder(self.account(room)):
                if isinstance(answer, xerr.ErrorFolderNotFound | xerr.ErrorItemNotFound
                              | xerr.ErrorNoPublicFolderReplicaAvailable):
                    raise xerr.ErrorFolderNotFound(f"Could not find distinguished folder 'calendar' ({answer})")
                if isinstance(answer, Exception):
                    raise answer
            return RoomInfo(room.lower())
        return await self._run(room, check)

    def _ews(self, value: datetime) -> EWSDateTime:
        utc = value.astimezone(UTC).replace(tzinfo=EWSTimeZone("UTC"))
        return EWSDateTime.from_datetime(utc).astimezone(self.tz)

    def _view(self, room: str, start: datetime, end: datetime, fields: tuple[str, ...]) -> list[tuple[str, Any]]:
        """(meeting UID, t:CalendarItem element) of a CalendarView, split until no piece comes back full.
        Items without a UID (drafts) are no bookings and are left out."""
        acct = self.account(room)
        out: list[tuple[str, Any]] = []
        step = timedelta(days=self.settings.chunk_days)
        pieces: list[tuple[datetime, datetime]] = []
        twice = False  # whether an instance can have been read twice (and the list needs deduplicating)
        cursor = start
        while cursor < end:
            pieces.append((cursor, min(end, cursor + step)))
            cursor += step
        while pieces:
            s, e = pieces.pop(0)
            page = self._wire.calendar_view(acct, self._ews(s), self._ews(e), FIND_COUNT_LIMIT, fields)
            items = page.items
            if (len(items) >= FIND_COUNT_LIMIT or not page.includes_last) and e - s > timedelta(hours=1):
                mid = s + (e - s) / 2
                pieces[:0] = [(s, mid), (mid, e)]
                twice = True
                continue
            if not page.includes_last:
                log.warning("ews.calendar_view_incomplete", room=room, start=s.isoformat(), end=e.isoformat(),
                            items=len(items))
            if page.masters:
                items = self._series.expand(room, items, s, e,
                                            lambda ids, extra: self._get(room, ids, fields + extra))
                twice = True  # an exception the view returned may come back with its series
            # An instance that spans a piece boundary appears in both pieces; the first piece keeps all.
            for i in items:
                uid = element_uid(i)
                if uid and (s == start or _starts_at_or_after(i, s)):
                    out.append((uid, i))
            twice = twice or bool(pieces)
        return _dedupe(out) if twice else out

    def _get(self, room: str, ids: list[str], fields: tuple[str, ...]) -> list[Any]:
        """GetItem of some items of the room with ``fields`` (the ones Exchange returns)."""
        return self._wire.get_items(self.account(room), ids, fields, self.settings.get_item_chunk)

    def _details(self, room: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """GetItem once per meeting (organizer and attendees are the same on every instance)."""
        first: dict[str, str] = {}
        for uid, i in items:
            ident = item_id(i)
            if ident and uid not in first:
                first[uid] = ident
        if not first:
            return {}
        details: dict[str, Any] = {}
        for d in self._get(room, list(first.values()), MEETING_FIELDS):
            meeting = element_uid(d)
            if meeting:
                details[meeting] = d
        return details

    def _bookings(self, room: str, items: list[tuple[str, Any]]) -> list[Booking]:
        return bookings_from_xml(items, room, self.settings.default_timezone, self._details(room, items))

    # -- what `gateway doctor` asks besides -------------------------------------------------------------------
    async def check_sync(self, room: str) -> None:
        """One SyncFolderItems of the room's calendar (one change at most): what every sync of the room needs."""
        def sync() -> None:
            self._wire.sync_items(self.account(room), None, 1, ())
        await self._run(room, sync)

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        def read() -> list[Booking]:
            return self._bookings(room, self._view(room, window.start, window.end, VIEW_FIELDS))
        return await self._run(room, read)

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        def read() -> list[Booking]:
            items = [(u, i) for u, i in self._view(room, window.start, window.end, VIEW_FIELDS) if u in uids]
            return self._bookings(room, items)
        return await self._run(room, read)

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        def page() -> Changes:
            changed: set[str] = set()
            deleted: set[str] = set()
            item_uids: dict[str, str] = {}
            complete: set[str] = set()
            bookings: list[Booking] = []
            fields = SYNC_FIELDS + VIEW_FIELDS + DETAIL_FIELDS if detailed else SYNC_FIELDS
            try:
                answer = self._wire.sync_items(self.account(room), sync_state, self.settings.sync_page_size, fields)
            except xerr.ErrorSyncFolderNotFound as e:
                if sync_state:
                    raise
                # No state was sent, so none can be invalid: the calendar itself is missing (as GetFolder says it).
                raise xerr.ErrorFolderNotFound(f"Could not find distinguished folder 'calendar' ({e})") from e
            for change_type, elem in answer.changes:
                if change_type == "delete":
                    ident = item_id(elem)
                    if ident:
                        deleted.add(ident)
                elif change_type in ("create", "update") and len(elem):
                    item = elem[0]  # <t:Create><t:CalendarItem><t:ItemId .../>...
                    uid, ident = element_uid(item), item_id(item)
                    if uid and ident:
                        changed.add(uid)
                        item_uids[ident] = uid
                        if detailed and item.findtext(f"{{{_TNS}}}CalendarItemType") == "Single":
                            # A single item is its own only booking: this page already says everything.
                            b = booking_from_xml(item, room, self.settings.default_timezone)
                            if b is not None:
                                bookings.append(b)
                                complete.add(uid)
            # As exchangelib: a page that hands back the state it was given ends the paging, full or not.
            more = not answer.includes_last and answer.sync_state != sync_state
            # The same meeting twice in a page (two items with one UID) is read the slow, thorough way.
            doubled = {uid for uid, n in Counter(b.uid for b in bookings).items() if n > 1}
            return Changes(frozenset(changed), frozenset(deleted), item_uids, answer.sync_state or "", more,
                           frozenset(complete - doubled), tuple(b for b in bookings if b.uid not in doubled))
        return await self._run(room, page)


def _starts_at_or_after(el: Any, when: datetime) -> bool:
    text = el.findtext(f"{{{_TNS}}}Start")
    if not text:
        return True
    return datetime.fromisoformat(text.replace("Z", "+00:00")) >= when


def _dedupe(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: set[tuple[str, str | None]] = set()
    out = []
    for uid, i in items:
        key = (uid, i.findtext(f"{{{_TNS}}}OriginalStart") or i.findtext(f"{{{_TNS}}}Start"))
        if key in seen:
            continue
        seen.add(key)
        out.append((uid, i))
    return out
