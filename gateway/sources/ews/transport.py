"""A read request POSTed straight on the urllib3 connection pool of an exchangelib session, when that is safe.

requests prepares, sends and wraps every request through layers a read of the wire does not need: the URL parsed
and re-quoted, every header validated, the adapter's pool looked up by the TLS settings, hooks, the response built
with its cookie jar. That was about half the CPU of a small EWS call (scripts/bench-ews-read.py). Here, per session,
the pool and the headers that do not change are found once, and each request goes to ``pool.urlopen``.

Only where nothing of requests' is lost: a session authenticated by NTLM (which authenticates the connection, not
the request: a connection already authenticated needs no header), without proxies or a client certificate. The
session's cookies go out and come back as requests would handle them. Every other answer of the server's than a
401 is handed back as the ``requests.Response`` requests would build (status, headers, body, URL), for exchangelib's
retry policy to judge. A 401 (a connection of the pool that has not authenticated yet) and any failure before an
answer are None: the caller sends the request the usual way, where requests_ntlm authenticates the connection and
requests raises its own exceptions (the requests are reads, so sending one again changes nothing). A request that
times out is raised as requests' ReadTimeout or ConnectTimeout at once: sending it again would double the wait.
"""

from __future__ import annotations

import threading
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
from urllib3.exceptions import ConnectTimeoutError, HTTPError, ReadTimeoutError
from urllib3.util import Timeout

from gateway.sources.ews import patches


@dataclass(frozen=True)
class _Route:
    pool: Any  # urllib3's HTTP(S)ConnectionPool of the session's adapter, for the endpoint
    path: str
    headers: dict[str, Any]  # the session's, as requests sends them on an NTLM session (Connection: Keep-Alive)
    names: dict[str, str]  # lower-case header name -> its spelling in ``headers``


_routes: weakref.WeakKeyDictionary[requests.Session, _Route | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def post(session: requests.Session, url: str, settings: dict[str, Any], headers: dict[str, str], data: bytes,
         timeout: float) -> requests.Response | None:
    """The answer to ``data`` POSTed to ``url`` with ``headers`` added to the session's; None: send it the usual
    way (``settings``: requests' merged environment settings for the endpoint)."""
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
        cookie = get_cookie_header(session.cookies, _as_request(url, sent))
        if cookie:
            sent["Cookie"] = cookie
    try:
        raw = route.pool.urlopen("POST", route.path, body=data, headers=sent, redirect=False, assert_same_host=False,
                                 preload_content=False, decode_content=False, retries=False,
                                 timeout=Timeout(connect=timeout, read=timeout))
    except ReadTimeoutError as e:
        raise requests.exceptions.ReadTimeout(e) from e
    except ConnectTimeoutError as e:
        raise requests.exceptions.ConnectTimeout(e) from e
    except (HTTPError, OSError):
        _forget(session)
        return None
    try:
        if raw.status == 401:
            raw.drain_conn()
            raw.release_conn()
            return None
        body = raw.read(decode_content=True) or b""
    except ReadTimeoutError as e:
        raw.release_conn()
        raise requests.exceptions.ReadTimeout(e) from e
    except (HTTPError, OSError):
        raw.release_conn()
        _forget(session)
        return None
    raw.release_conn()
    r = requests.Response()
    r.status_code = raw.status
    r.headers = CaseInsensitiveDict(raw.headers)
    r.encoding = get_encoding_from_headers(r.headers)
    r.reason = raw.reason
    r.url = url
    r.raw = raw
    r._content = body
    r._content_consumed = True
    if "set-cookie" in raw.headers:
        request = _as_request(url, sent)
        extract_cookies_to_jar(session.cookies, request, raw)
        extract_cookies_to_jar(r.cookies, request, raw)
    return r


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
    parts = urlsplit(endpoint)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return _Route(pool, path or "/", headers, {k.lower(): k for k in headers})


def _as_request(url: str, headers: dict[str, Any]) -> Any:
    """What requests' cookie helpers read of a request: its URL and headers."""
    return SimpleNamespace(url=url, headers=headers)


def _forget(session: requests.Session) -> None:
    """The session's pool failed us (closed, evicted, the endpoint gone): found again on the next request."""
    with _lock:
        _routes.pop(session, None)
