"""The EWS read path on the wire: the GetFolder, FindItem (CalendarView), GetItem, SyncFolderItems and (streaming)
Subscribe requests of EwsSource and its feed, and their answers, without exchangelib's service machinery.

exchangelib builds every request through its object model and walks every answer through generators; for a room's
import that was about a quarter of the gateway's CPU (scripts/bench-ews-read.py). Here:

- a request is a byte template, made once per (operation, fields, API version, time zone) by exchangelib itself
  (its payload and its SOAP envelope, around placeholder values) and filled with escaped values: the bytes Exchange
  gets are the bytes exchangelib would send (tests/test_ews_wire.py holds them equal), RequestServerVersion,
  ExchangeImpersonation and TimeZoneContext included, and the header X-AnchorMailbox (the room), as exchangelib sends
  it for these operations; Subscribe asks for server affinity as exchangelib's service does (X-PreferServerAffinity,
  the account's X-BackEndOverrideCookie, the cookie of the answer kept as the account's);
- it is POSTed on a session of exchangelib's pool the way exchangelib's ``post_ratelimited`` posts (``Wire._send``),
  so authentication (NTLM, Basic), the connection pool, the CA bundle (patches.trust), the retry policy's HTTP
  status handling and the errors of a failed connection stay exchangelib's; on a connection NTLM has authenticated
  a request skips requests', urllib3's and http.client's layers (sources/ews/transport.py, http1.py);
- the answer is parsed once, with a parser that expands no entity, loads no DTD and reads no network; SOAP faults
  and response codes become the exceptions exchangelib raises for them (so ``source.translate`` maps them as
  before), with exchangelib's own rules for which errors come back as values; ErrorServerBusy keeps
  BackOffMilliseconds, from a fault or from a response message;
- each request is counted once on the thread's call counter, by operation and answer (patches.count).

Writes and the streams themselves (GetStreamingEvents) stay on exchangelib.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import requests
from exchangelib import Account, EWSDateTime
from exchangelib import errors as xerr
from exchangelib.folders import Calendar, Root
from exchangelib.properties import CalendarView, DistinguishedFolderId, Mailbox
from exchangelib.services import FindItem, GetFolder, GetItem, SubscribeToStreaming, SyncFolderItems
from exchangelib.services.common import EWSService
from exchangelib.util import CONNECTION_ERRORS, TLS_ERRORS
from exchangelib.version import Version
from lxml import etree
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from gateway.sources.ews import patches, transport

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"

# Untrusted input: no entity is expanded, no DTD loaded, nothing fetched, no node beyond libxml2's safe limits.
# Recovering, as exchangelib does: Exchange writes characters XML 1.0 forbids (&#x1; in a subject), and one such
# meeting must not make a whole room unreadable.
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, recover=True)

# exchangelib tries the other API versions when a request is refused with one of these (services/common.py).
_VERSION_ERRORS = (xerr.ErrorInvalidServerVersion, xerr.ErrorIncorrectSchemaVersion, xerr.ErrorInvalidRequest,
                   xerr.ErrorInvalidSchemaVersionForMailboxVersion)
_SERVICES: dict[str, type[EWSService]] = {
    "GetFolder": GetFolder, "FindItem": FindItem, "GetItem": GetItem, "SyncFolderItems": SyncFolderItems,
    "Subscribe": SubscribeToStreaming}
# The API versions each service speaks, newest first, as exchangelib's fallback tries them: a fixed table, where
# supported_api_versions() builds every Version again (a twentieth of a call's CPU).
_API_VERSIONS = {op: tuple(svc.supported_api_versions()) for op, svc in _SERVICES.items()}
_CONTAINERS: dict[str, str | None] = {
    "GetFolder": f"{{{MNS}}}Folders", "FindItem": f"{{{MNS}}}RootFolder", "GetItem": f"{{{MNS}}}Items",
    "SyncFolderItems": f"{{{MNS}}}Changes", "Subscribe": None}  # (None: the response message itself)
# Operations that ask for server affinity, as exchangelib's services of them do (prefer_affinity): the request says
# X-PreferServerAffinity and the account's X-BackEndOverrideCookie, and the cookie the answer sets is the account's.
_AFFINITY = frozenset(("Subscribe",))
# Whether an Items element holds a series master: evaluated by libxml2 (lxml's find() with a predicate walks the
# items in Python, a quarter of a millisecond for a room's view).
_HAS_MASTER = etree.XPath("boolean(*[t:CalendarItemType='RecurringMaster'])", namespaces={"t": TNS})
_CHANGE_TYPES = {f"{{{TNS}}}Create": "create", f"{{{TNS}}}Update": "update", f"{{{TNS}}}Delete": "delete",
                 f"{{{TNS}}}ReadFlagChange": "read_flag_change"}

# Placeholders a template is made with: values no real request carries.
_ROOM = "gateway-template-room@template.invalid"
_ITEM = "GatewayTemplateItemId"
_STATE = "GatewayTemplateSyncState"
_MAX = 487
_ENTRIES = 487


@dataclass(frozen=True)
class ViewPage:
    items: list[etree._Element]  # the t:CalendarItem elements (exchangelib's tolerated errors left out)
    includes_last: bool  # False: the server left some out (EWSFindCountLimit): split the range
    masters: bool = False  # a RecurringMaster among them (a server that does not expand series; series.py)


@dataclass(frozen=True)
class SyncPage:
    changes: list[tuple[str, etree._Element]]  # (create / update / delete / read_flag_change / other, element)
    sync_state: str | None
    includes_last: bool


class _Template:
    """A request as bytes between named slots."""

    def __init__(self, text: bytes, markers: Sequence[tuple[bytes, str]]) -> None:
        at: list[tuple[int, int, str]] = []
        for marker, slot in markers:
            start = text.find(marker)
            if start < 0:
                raise RuntimeError(f"exchangelib's request has no {marker!r}: the wire templates need updating")
            while start >= 0:
                at.append((start, start + len(marker), slot))
                start = text.find(marker, start + len(marker))
        at.sort()
        self.parts: list[bytes] = []
        self.slots: list[str] = []
        cursor = 0
        for start, end, slot in at:
            self.parts.append(text[cursor:start])
            self.slots.append(slot)
            cursor = end
        self.parts.append(text[cursor:])

    def fill(self, values: dict[str, bytes]) -> bytes:
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return b"".join(out)


# What lxml escapes in a double-quoted attribute besides &, < and >.
_ATTRIBUTE = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


def text(value: str) -> bytes:
    """A value as XML character data, escaped as lxml serializes it."""
    return escape(value).encode()


def attribute(value: str) -> bytes:
    """A value inside a double-quoted attribute, escaped as lxml serializes it."""
    return escape(value, _ATTRIBUTE).encode()


def encode(*, start: EWSDateTime | None = None, end: EWSDateTime | None = None, max_entries: int = 1000,
           ids: Sequence[str] = (), sync_state: str | None = None, max_changes: int = 512) -> dict[str, bytes]:
    """The values of a request's slots, escaped; the keywords are those of ``exchangelib_request``."""
    values = {"entries": b'MaxEntriesReturned="%d"' % max_entries,
              "ids": _item_ids(ids),
              "state": b"" if not sync_state else b"<m:SyncState>%s</m:SyncState>" % text(sync_state),
              "max": b"<m:MaxChangesReturned>%d</m:MaxChangesReturned>" % max_changes}
    if start is not None and end is not None:
        values["start"], values["end"] = attribute(start.ewsformat()), attribute(end.ewsformat())
    return values


def _item_ids(ids: Sequence[str]) -> bytes:
    """``<t:ItemId Id="..."/>`` for each id, escaped in one pass over them all (a GetItem names a room's meetings,
    ~130: escaped one by one, that was most of the request's making)."""
    if not ids:
        return b""
    joined = "\x1f".join(ids)  # (a control character: no item id holds it, and escaping leaves it as it is)
    if joined.count("\x1f") != len(ids) - 1:
        return b"".join(b'<t:ItemId Id="%s"/>' % attribute(ident) for ident in ids)
    return b'<t:ItemId Id="' + attribute(joined).replace(b"\x1f", b'"/><t:ItemId Id="') + b'"/>'


class Wire:
    """The read requests of one EWS source (thread-safe: templates are made once, under a lock)."""

    def __init__(self) -> None:
        self._templates: dict[tuple[Any, ...], _Template] = {}
        self._environments: dict[tuple[Any, ...], dict[str, Any]] = {}  # requests' settings from the environment
        self._lock = threading.Lock()

    # -- the operations ------------------------------------------------------------------------------------------
    def get_folder(self, acct: Account) -> list[Any]:
        """GetFolder of the room's calendar (IdOnly): the t:CalendarFolder element, or the error exchangelib returns
        as a value (ErrorFolderNotFound...)."""
        out: list[Any] = []
        for container in self._call(acct, "GetFolder", (), {}):
            if isinstance(container, Exception):
                out.append(container)
            elif container is not None:
                out.extend(container)
        return out

    def calendar_view(self, acct: Account, start: EWSDateTime, end: EWSDateTime, max_entries: int,
                      fields: tuple[str, ...]) -> ViewPage:
        """One FindItem with a CalendarView over [start, end) (occurrences expanded by the server)."""
        items: list[etree._Element] = []
        last, masters = True, False
        for root in self._call(acct, "FindItem", fields, encode(start=start, end=end, max_entries=max_entries)):
            if root is None or isinstance(root, Exception):
                continue  # tolerated by exchangelib (ErrorItemNotFound...): nothing to read in this folder
            last = last and (root.get("IncludesLastItemInRange") or "").strip().lower() in ("true", "1")
            if root.get("TotalItemsInView") == "0":
                continue
            found = root.find(f"{{{TNS}}}Items")
            if found is None:
                raise xerr.MalformedResponseError("No Items element in the FindItem answer")
            items.extend(found)
            masters = masters or bool(_HAS_MASTER(found))
        return ViewPage(items, last, masters)

    def get_items(self, acct: Account, ids: Sequence[str], fields: tuple[str, ...], chunk: int) -> list[Any]:
        """GetItem of ``ids``, ``chunk`` at a time: the item elements Exchange returned (an item gone meanwhile is
        left out, as exchangelib returns it as a value)."""
        out: list[Any] = []
        for i in range(0, len(ids), max(1, chunk)):
            for container in self._call(acct, "GetItem", fields, encode(ids=ids[i:i + chunk])):
                if container is not None and not isinstance(container, Exception):
                    out.extend(container)
        return out

    def sync_items(self, acct: Account, sync_state: str | None, max_changes: int,
                   fields: tuple[str, ...]) -> SyncPage:
        """One SyncFolderItems page of the room's calendar."""
        values = encode(sync_state=sync_state, max_changes=max_changes)
        changes: list[tuple[str, etree._Element]] = []
        state: str | None = None
        last = True
        for message, container in self._call(acct, "SyncFolderItems", fields, values, with_message=True):
            state_el = message.find(f"{{{MNS}}}SyncState")
            state = state_el.text if state_el is not None else None
            last_el = message.find(f"{{{MNS}}}IncludesLastItemInRange")
            last = last_el is None or (last_el.text or "").strip().lower() in ("true", "1")
            if isinstance(container, Exception):
                raise container
            if container is not None:
                changes.extend((_CHANGE_TYPES.get(el.tag, "other"), el) for el in container)
        return SyncPage(changes, state, last)

    def subscribe_streaming(self, acct: Account) -> str | None:
        """Subscribe (streaming) to the room's calendar for every event type: the subscription id. With server
        affinity as exchangelib asks for it: the cookie the answer sets is kept as the account's affinity_cookie,
        for the GetStreamingEvents of the subscription (sources/ews/streaming.py)."""
        for message in self._call(acct, "Subscribe", (), {}):
            if isinstance(message, Exception):
                raise message
            if message is not None and not isinstance(message, bool):
                return message.findtext(f"{{{MNS}}}SubscriptionId")
        return None

    # -- one request ---------------------------------------------------------------------------------------------
    def _call(self, acct: Account, operation: str, fields: tuple[str, ...], values: dict[str, bytes],
              with_message: bool = False) -> list[Any]:
        """Send one request of ``operation`` for the room of ``acct``; the containers of its response messages (or
        the errors exchangelib returns as values), with their messages if asked. Counted once, by its answer: the
        first error code, as Exchange or the transport gave it (before exchangelib's rules below)."""
        protocol = acct.protocol
        try:
            code = "NoError"
            out: list[Any] = []
            try:
                messages = self._post(acct, operation, fields, values)
                svc = _SERVICES[operation](account=acct)
                container = _CONTAINERS[operation]
                for msg in messages:
                    found = _container(svc, msg, container)
                    if isinstance(found, xerr.EWSError) and code == "NoError":
                        code = type(found).__name__
                    out.append((msg, found) if with_message else found)
            except Exception as e:
                patches.count(operation, type(e).__name__)
                raise
            patches.count(operation, code)
            return out
        # exchangelib's rules for these (services/common.py _get_elements), with its fail-fast policy:
        except xerr.ErrorServerBusy as e:
            if not e.back_off:
                e.back_off = protocol.RETRY_WAIT
            raise
        except xerr.ErrorTimeoutExpired as e:
            # With more than one session, a timeout is the server asking for less load.
            if protocol.session_pool_size <= 1:
                raise
            raise xerr.ErrorServerBusy(f"Reraised from {e.__class__.__name__}({e})",
                                       back_off=protocol.RETRY_WAIT) from e
        except (xerr.ErrorTooManyObjectsOpened, xerr.ErrorInternalServerTransientError) as e:
            raise xerr.ErrorServerBusy(f"Reraised from {e.__class__.__name__}({e})",
                                       back_off=protocol.RETRY_WAIT) from e

    def _post(self, acct: Account, operation: str, fields: tuple[str, ...],
              values: dict[str, bytes]) -> list[etree._Element]:
        """POST the request; its response messages. A version the mailbox refuses is followed by the others, newest
        first, as exchangelib does."""
        protocol = acct.protocol
        hint = acct.version.api_version
        versions = (hint, *(v for v in _API_VERSIONS[operation] if v != hint))
        for api_version in versions:
            body = self.request(acct, operation, fields, api_version, values)
            headers = {"X-AnchorMailbox": acct.primary_smtp_address}
            affinity = operation in _AFFINITY
            if affinity:
                headers["X-PreferServerAffinity"] = "True"
                if acct.affinity_cookie:
                    headers["X-BackEndOverrideCookie"] = acct.affinity_cookie
            session = protocol.get_session()
            r = self._send(protocol, session, headers, body, idempotent=not affinity)
            if affinity:  # (the session's cookies are this answer's until the session is given back)
                for cookie in session.cookies:
                    if cookie.name == "X-BackEndOverrideCookie":
                        acct.affinity_cookie = cookie.value
                        break
            protocol.release_session(session)
            try:
                content = r.content
            finally:
                r.close()
            try:
                return self._messages(acct, operation, api_version, content)
            except _VERSION_ERRORS:
                continue
        raise xerr.ErrorInvalidSchemaVersionForMailboxVersion(f"Tried versions {versions} but all were invalid")

    def _send(self, protocol: Any, session: Any, headers: dict[str, str], data: bytes,
              idempotent: bool = True) -> requests.Response:
        """exchangelib's ``post_ratelimited`` (util.py) under the fail-fast policy the source configures, the same
        errors for the same failures, without what requests repeats on every request: the environment's proxies and
        CA bundle are read once per endpoint (an appliance's environment does not change while it runs), and the
        session's headers are merged once. The session is retired on any failure, as exchangelib does. A request
        goes straight to the session's connection pool where that loses nothing of requests'
        (sources/ews/transport.py), and requests' way where it cannot. An answer that breaks off is sent again
        requests' way only if the request is ``idempotent`` (every read but Subscribe, which would subscribe twice)."""
        url = protocol.service_endpoint
        key = (url, session.trust_env, session.verify, session.cert, tuple(sorted(session.proxies.items())))
        settings = self._environments.get(key)
        if settings is None:
            settings = session.merge_environment_settings(url, {}, False, None, None)
            # stream=True, then the body in one read (_read_body): requests reads a body 10 KiB at a time, through
            # a generator and urllib3's decoder each time, a tenth of the CPU of a call with a room's answer.
            settings = self._environments[key] = {**settings, "stream": True}
        try:
            r = transport.post(session, url, settings, headers, data, protocol.TIMEOUT, idempotent=idempotent)
        except CONNECTION_ERRORS as e:  # (a timeout: sent again, it would take as long)
            raise _connection_broke(protocol, session, e) from e
        if r is None:
            r = _through_requests(protocol, session, url, settings, headers, data)
        try:
            protocol.retry_policy.raise_response_errors(r)
        except BaseException:
            r.close()
            protocol.retire_session(session)
            raise
        return r

    def _messages(self, acct: Account, operation: str, api_version: str, content: bytes) -> list[etree._Element]:
        """The response messages of an answer; a SOAP fault raised as exchangelib raises it."""
        try:
            root = etree.fromstring(content, PARSER) if content else None
        except etree.XMLSyntaxError as e:
            raise xerr.SOAPError(f"Bad SOAP response: {e}") from e
        if root is None:
            raise xerr.SOAPError(f"Bad SOAP response: No root element found: {content[:200]!r}")
        header = root.find(f"{{{SOAP}}}Header")
        body = root.find(f"{{{SOAP}}}Body")
        if body is None:
            raise xerr.MalformedResponseError("No Body element in SOAP response")
        if header is not None:
            _update_version(acct, api_version, header)
        response = body.find(f"{{{MNS}}}{operation}Response")
        if response is None:
            fault = body.find(f"{{{SOAP}}}Fault")
            if fault is None:
                raise xerr.SOAPError(f"Unknown SOAP response (expected {operation}Response or Fault)")
            _SERVICES[operation]._raise_soap_errors(fault=fault)
            raise xerr.SOAPError(f"Unreadable SOAP fault in the {operation} answer")  # (raised above)
        messages = response.find(f"{{{MNS}}}ResponseMessages")
        if messages is None:
            return [response]
        return messages.findall(f"{{{MNS}}}{operation}ResponseMessage")

    # -- the templates -------------------------------------------------------------------------------------------
    def request(self, acct: Account, operation: str, fields: tuple[str, ...], api_version: str,
                values: dict[str, bytes]) -> bytes:
        """The bytes of a request for the room of ``acct`` (``values``: from ``encode``)."""
        return self._template(acct, operation, fields, api_version).fill(
            {**values, "room": text(acct.primary_smtp_address)})

    def _template(self, acct: Account, operation: str, fields: tuple[str, ...], api_version: str) -> _Template:
        tz = acct.default_timezone
        key = (operation, fields, acct.version.api_version, api_version, tz.key)
        found = self._templates.get(key)
        if found is None:
            with self._lock:
                found = self._templates.get(key)
                if found is None:
                    found = self._templates[key] = _make_template(acct, operation, fields, api_version)
        return found


def _through_requests(protocol: Any, session: Any, url: str, settings: dict[str, Any], headers: dict[str, str],
                      data: bytes) -> requests.Response:
    """The request through requests' session (its auth hooks, cookie jar and adapter), the body read whole; a failed
    connection raised as exchangelib raises it, the session retired."""
    merged = CaseInsensitiveDict(session.headers)
    merged.update(headers)
    prepared = requests.PreparedRequest()
    prepared.prepare(method="POST", url=url, headers=merged, data=data, auth=session.auth,
                     cookies=session.cookies, hooks=session.hooks)
    try:
        r = session.send(prepared, timeout=protocol.TIMEOUT, allow_redirects=False, **settings)
        _read_body(r)
    except TLS_ERRORS as e:
        protocol.retire_session(session)
        raise xerr.TransportError(str(e)) from e  # not retried: persistent
    except CONNECTION_ERRORS as e:
        raise _connection_broke(protocol, session, e) from e
    except KeyError as e:
        protocol.retire_session(session)
        if e.args[0] != "www-authenticate":
            raise
        # An HTTP error status during the NTLM handshake.
        raise xerr.ErrorInternalServerTransientError(f"Reraised from {e.__class__.__name__}({e})") from e
    except BaseException:
        protocol.retire_session(session)
        raise
    return r


def _connection_broke(protocol: Any, session: Any, e: BaseException) -> xerr.ErrorTimeoutExpired:
    """What exchangelib raises for a connection that failed or timed out; the session is retired."""
    protocol.retire_session(session)
    return xerr.ErrorTimeoutExpired(f"Reraised from {e.__class__.__name__}({e})")


def _read_body(r: requests.Response) -> None:
    """The whole body of a streamed response, read at once and kept as requests keeps it (``r.content``), with the
    exceptions requests raises for a broken read (so ``Wire._send`` maps them as before). A body the authentication
    hook or the retry policy already read is left as it is. urllib3 gives the connection back to the pool once the
    body is read whole, and closes it on a failure."""
    if r._content_consumed or r.raw is None:
        return
    try:
        r._content = r.raw.read(decode_content=True) or b""
    except ProtocolError as e:
        raise requests.exceptions.ChunkedEncodingError(e) from e
    except DecodeError as e:
        raise requests.exceptions.ContentDecodingError(e) from e
    except ReadTimeoutError as e:
        raise requests.exceptions.ConnectionError(e) from e
    except SSLError as e:
        raise requests.exceptions.SSLError(e) from e
    r._content_consumed = True


def _container(svc: EWSService, message: etree._Element, name: str | None) -> Any:
    """exchangelib's reading of a response message (the container, None for a message with nothing in it, or the
    error it returns as a value), with BackOffMilliseconds kept when a message says ErrorServerBusy."""
    if message.get("ResponseClass") == "Success" and len(message):
        # Success and NoError, as almost every message says (GetItem answers a message per item): exchangelib's first
        # case, read from the message's first child, as Exchange writes it, instead of by its generic lookups.
        code = message[0]
        if code.tag == _RESPONSE_CODE and code.text == "NoError":
            if not name:
                return message
            found = message.find(name)
            if found is not None:
                return found  # (none: exchangelib's reading below says the answer is malformed)
    try:
        found = EWSService._get_element_container(svc, message=message, name=name)
        return None if isinstance(found, bool) else found
    except xerr.ErrorServerBusy as e:
        if not e.back_off:
            e.back_off = _back_off(message.find(f"{{{MNS}}}MessageXml"))
        raise


def _back_off(msg_xml: etree._Element | None) -> float | None:
    if msg_xml is None:
        return None
    for value in msg_xml.iterfind(f"{{{TNS}}}Value"):
        if value.get("Name") == "BackOffMilliseconds":
            try:
                return int(value.text or "") / 1000.0
            except ValueError:
                return None
    return None


def _update_version(acct: Account, api_version: str, header: etree._Element) -> None:
    """What exchangelib does with the ServerVersionInfo of an answer: the account's version follows the server. Every
    answer carries it and a server says the same each time: what exchangelib reads of it (the requested version and
    the element's attributes) is read once."""
    key = None
    version = None
    if len(header) == 1:
        info = header[0]
        if info.tag == _SERVER_VERSION_INFO and not len(info):  # (all it says is in its attributes)
            key = (api_version, tuple(info.items()))
            version = _versions.get(key)
    if version is None:
        try:
            version = Version.from_soap_header(requested_api_version=api_version, header=header)
        except xerr.TransportError:
            return
        if key is not None:
            if len(_versions) >= 64:  # (a few servers' versions: bounded all the same)
                _versions.clear()
            _versions[key] = version
    if acct.version != version:
        acct.version = version


_versions: dict[tuple[str, tuple[tuple[str, str], ...]], Version] = {}
_SERVER_VERSION_INFO = f"{{{TNS}}}ServerVersionInfo"
_RESPONSE_CODE = f"{{{MNS}}}ResponseCode"


def _calendar(acct: Account) -> Calendar:
    return Calendar(root=Root(account=acct), _distinguished_id=DistinguishedFolderId(
        id="calendar", mailbox=Mailbox(email_address=acct.primary_smtp_address)))


def additional_fields(acct: Account, names: tuple[str, ...]) -> Any:
    """exchangelib's field paths for ``names`` of a calendar item (attributes such as the item id always come),
    without the end's time zone exchangelib adds to read End in its own objects: the mapping reads times in UTC and
    the meeting's zone from StartTimeZone, and every item of an answer carried the unread zone (a whole
    TimeZoneDefinition, periods and transitions included, where Exchange writes it out)."""
    return {f for f in _calendar(acct).normalize_fields(fields=list(names))
            if not f.field.is_attribute and f.field.name != "_end_timezone"}


def exchangelib_request(acct: Account, operation: str, fields: tuple[str, ...], api_version: str, *,
                        start: EWSDateTime | None = None, end: EWSDateTime | None = None, max_entries: int = 1000,
                        ids: Sequence[str] = (), sync_state: str | None = None, max_changes: int = 512) -> bytes:
    """The request exchangelib itself builds for these values: what a template is made from."""
    svc = _SERVICES[operation](account=acct)
    extra = additional_fields(acct, fields)
    calendar = _calendar(acct)
    payload: Any
    if operation == "GetFolder":
        payload = svc.get_payload(folders=[calendar._distinguished_id], additional_fields=[], shape="IdOnly")
    elif operation == "FindItem":
        view = CalendarView(start=start, end=end, max_items=max_entries)
        payload = svc.get_payload(folders=[calendar], additional_fields=extra, restriction=None, order_fields=None,
                                  query_string=None, shape="IdOnly", depth="Shallow", calendar_view=view,
                                  page_size=100, offset=0)
    elif operation == "GetItem":
        payload = svc.get_payload(items=[(i, None) for i in ids], additional_fields=extra, shape="IdOnly")
    elif operation == "Subscribe":
        payload = svc.get_payload(folders=[calendar], event_types=SubscribeToStreaming.EVENT_TYPES)
    else:
        payload = svc.get_payload(folder=calendar, shape="IdOnly", additional_fields=extra, sync_state=sync_state,
                                  ignore=None, max_changes_returned=max_changes, sync_scope=None)
    data: bytes = svc.wrap(content=payload, api_version=api_version)
    return data


def _make_template(acct: Account, operation: str, fields: tuple[str, ...], api_version: str) -> _Template:
    """The template of a request, from exchangelib's own request for an account like ``acct`` around placeholders."""
    model = Account(_ROOM, config=acct.protocol.config, access_type=acct.access_type, autodiscover=False,
                    default_timezone=acct.default_timezone)
    model.version = acct.version
    tz = acct.default_timezone
    start, end = EWSDateTime(2001, 2, 3, 4, 5, 6, tzinfo=tz), EWSDateTime(2002, 3, 4, 5, 6, 7, tzinfo=tz)
    data = exchangelib_request(model, operation, fields, api_version, start=start, end=end, max_entries=_ENTRIES,
                               ids=[_ITEM], sync_state=_STATE, max_changes=_MAX)
    markers: list[tuple[bytes, str]] = [(text(_ROOM), "room")]
    if operation == "FindItem":
        markers += [(attribute(start.ewsformat()), "start"), (attribute(end.ewsformat()), "end"),
                    (b'MaxEntriesReturned="%d"' % _ENTRIES, "entries")]
    elif operation == "GetItem":
        markers.append((b'<t:ItemId Id="%s"/>' % attribute(_ITEM), "ids"))
    elif operation == "SyncFolderItems":
        markers += [(b"<m:SyncState>%s</m:SyncState>" % text(_STATE), "state"),
                    (b"<m:MaxChangesReturned>%d</m:MaxChangesReturned>" % _MAX, "max")]
    return _Template(data, markers)

