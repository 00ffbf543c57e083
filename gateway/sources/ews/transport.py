"""An EWS request of the wire POSTed straight on a connection of an exchangelib session's urllib3 pool, if safe.

requests prepares, sends and wraps every request through layers a read of the wire does not need: the URL parsed
and re-quoted, every header validated, the adapter's pool looked up by the TLS settings, hooks, the response built
with its cookie jar; urllib3 and http.client then write each header on its own and parse the answer's head with the
email package. Here, per session, the pool, the Host and the headers that do not change are found once, and each
request is one exchange on a pooled connection's socket (sources/ews/http1.py).

Only where nothing of requests' is lost: a session authenticated by NTLM (which authenticates the connection, not
the request: a connection already authenticated needs no header), without proxies or a client certificate, on a
connection that is open. The session's cookies go out and come back as requests would handle them. Every other answer
of the server's than a 401 is handed back as the ``requests.Response`` requests would build (status, headers, body,
URL), for exchangelib's retry policy to judge. A 401 (a connection of the pool that has not authenticated yet), a
connection not open yet, an answer this does not read and any failure before an answer are None: the caller sends
the request the usual way, where requests_ntlm authenticates the connection and requests raises its own exceptions.
A read sent again changes nothing; a Subscribe is sent again only if nothing of it was sent, and an answer to it
that breaks off is raised as requests raises it (ChunkedEncodingError, or ConnectionError if none came). A request
that times out is raised as requests' ReadTimeout at once: sending it again would double the wait.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.cookies import extract_cookies_to_jar, get_cookie_header
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity, get_encoding_from_headers
from requests_ntlm import HttpNtlmAuth
from urllib3.exceptions import HTTPError, ReadTimeoutError

from gateway.sources.ews import http1, patches


@dataclass(frozen=True)
class _Route:
    pool: Any  # urllib3's HTTP(S)ConnectionPool of the session's adapter, for the endpoint
    path: str
    host: str  # the Host header, as http.client writes it for the pool's connections
    headers: dict[str, Any]  # the session's, as requests sends them on an NTLM session (Connection: Keep-Alive)
    names: dict[str, str]  # lower-case header name -> its spelling in ``headers``


_routes: weakref.WeakKeyDictionary[requests.Session, _Route | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def post(session: requests.Session, url: str, settings: dict[str, Any], headers: dict[str, str], data: bytes,
         timeout: float, idempotent: bool = True) -> requests.Response | None:
    """The answer to ``data`` POSTed to ``url`` with ``headers`` added to the session's; None: send it the usual
    way (``settings``: requests' merged environment settings for the endpoint). A request not ``idempotent`` is
    never sent twice: an answer that breaks off after it was sent is raised as requests raises it."""
    route = _route(session, url, settings)
    if route is None:
        return None
    sent = dict(route.headers)
    for name, value in headers.items():
        check_header_validity((name, value))  # (a value with a line break must not reach the wire)
        sent.pop(route.names.get(name.lower(), name), None)
        sent[name] = value
    sent["Content-Length"] = str(len(data))
    if session.cookies:
        cookie = _cookie_header(session, url, sent)
        if cookie:
            sent["Cookie"] = cookie
    pool = route.pool
    try:
        conn = pool._get_conn()  # (urllib3's own way to a connection of its pool: the same in 1.x and 2.x)
    except (HTTPError, OSError):  # (the pool closed)
        _forget(session)
        return None
    if conn.sock is None:  # not open yet, or closed by the pool as dropped: requests' way opens and authenticates it
        pool._put_conn(conn)
        return None
    answer = None
    try:
        answer = http1.exchange(conn.sock, http1.request_head(route.path, route.host, sent) + data, timeout)
    except TimeoutError as e:
        raise requests.exceptions.ReadTimeout(
            ReadTimeoutError(pool, url, f"Read timed out. (read timeout={timeout})")) from e
    except (http1.ProtocolError, OSError) as e:
        _forget(session)
        if not idempotent:  # (as requests' way fails: an answer cut off, or none)
            broke = requests.exceptions.ChunkedEncodingError if isinstance(e, http1.ProtocolError) \
                else requests.exceptions.ConnectionError
            raise broke(f"Connection broken: {e}") from e
        return None
    finally:
        if answer is None or not answer.keep_alive:
            conn.close()  # (a failed exchange leaves the connection in no known state)
        pool._put_conn(conn)
    if answer.status == 401:
        return None
    r = requests.Response()
    r.status_code = answer.status
    r.headers = CaseInsensitiveDict(answer.headers)
    r.encoding = get_encoding_from_headers(r.headers)
    r.reason = answer.reason
    r.url = url
    r._content = answer.body
    r._content_consumed = True
    if "set-cookie" in answer.headers:
        request = _as_request(url, sent)
        original = SimpleNamespace(_original_response=SimpleNamespace(msg=HeadLines(answer.head)))
        extract_cookies_to_jar(session.cookies, request, original)
        extract_cookies_to_jar(r.cookies, request, original)
    return r


def _cookie_header(session: requests.Session, url: str, sent: dict[str, Any]) -> str | None:
    """The Cookie header requests' jar writes for a request to ``url``, made again only when the jar's cookies are
    not the ones it was made of (each attribute the header depends on) or one of them has expired since: the jar's
    policy checks cost 50 µs a request, a third of a read's exchange, for the same header every time."""
    jar = session.cookies
    found = _cookie_headers.get(session)
    if found is not None and found[0] == (id(jar), url, _cookies_of(jar)) and time.time() < found[2]:
        return found[1]
    header: str | None = get_cookie_header(jar, _as_request(url, sent))  # (which drops expired cookies)
    until = min((c.expires for c in jar if c.expires is not None), default=math.inf)
    with _lock:
        _cookie_headers[session] = ((id(jar), url, _cookies_of(jar)), header, until)
    return header


def _cookies_of(jar: requests.cookies.RequestsCookieJar) -> tuple[tuple[Any, ...], ...]:
    return tuple((c.version, c.name, c.value, c.port, c.port_specified, c.domain, c.domain_specified,
                  c.domain_initial_dot, c.path, c.path_specified, c.secure, c.expires, c.discard, c.rfc2109)
                 for c in jar)


_cookie_headers: weakref.WeakKeyDictionary[requests.Session, tuple[Any, str | None, float]] = \
    weakref.WeakKeyDictionary()


def _route(session: requests.Session, url: str, settings: dict[str, Any]) -> _Route | None:
    try:
        return _routes[session]
    except KeyError:
        pass
    with _lock:
        route = _routes[session] = _make_route(session, url, settings)
    return route


def _make_route(session: requests.Session, url: str, settings: dict[str, Any]) -> _Route | None:
    if type(session.auth) is not HttpNtlmAuth or settings.get("proxies") or session.proxies \
            or settings.get("cert") or session.cert or any(session.hooks.values()):
        return None
    adapter = session.get_adapter(url)
    if not isinstance(adapter, patches.VerifyingAdapter):  # (patches.install() not run: not ours to bypass)
        return None
    verify = patches.trusted_bundle(url) or settings.get("verify", True)
    prepared = requests.PreparedRequest()
    prepared.prepare(method="POST", url=url, headers=session.headers, data=b"", auth=session.auth,
                     cookies=requests.cookies.RequestsCookieJar())
    pool = adapter.get_connection_with_tls_context(prepared, verify, None, None)
    endpoint = str(prepared.url)
    adapter.cert_verify(pool, endpoint, verify, None)
    headers = {k: v for k, v in prepared.headers.items() if k.lower() not in ("content-length", "cookie")}
    names = {k.lower(): k for k in headers}
    if "user-agent" not in names or "accept-encoding" not in names or "host" in names \
            or not all(isinstance(v, str) for v in headers.values()):
        return None  # (urllib3 and http.client would write headers of their own: theirs is the way)
    parts = urlsplit(endpoint)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return _Route(pool, path or "/", _host_header(pool), headers, names)


def _host_header(pool: Any) -> str:
    """The Host header http.client writes for a connection of ``pool`` (http.client's putrequest)."""
    host = pool.host.rstrip(".")  # (urllib3's connections give http.client their host so)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    default = 443 if pool.scheme == "https" else 80
    return host if pool.port in (None, default) else f"{host}:{pool.port}"


class HeadLines:
    """An answer's header lines as the cookie jar reads them (http.cookiejar asks only ``get_all``): each value as
    http.client's parser gives it, without the email package's parser that http.client runs (60 µs an answer, and
    an Exchange answer may set a routing cookie every time). http1 refuses folded lines, so a line is a header."""

    def __init__(self, head: bytes) -> None:
        self._lines = head.decode("iso-8859-1").split("\r\n") if head else []

    def get_all(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        found = []
        for line in self._lines:
            field, colon, value = line.partition(":")
            if colon and field.lower() == key:
                found.append(value.lstrip(" \t"))
        return found or failobj


def _as_request(url: str, headers: dict[str, Any]) -> Any:
    """What requests' cookie helpers read of a request: its URL and headers."""
    return SimpleNamespace(url=url, headers=headers)


def _forget(session: requests.Session) -> None:
    """The session's pool failed us (closed, evicted, the endpoint gone): found again on the next request."""
    with _lock:
        _routes.pop(session, None)
