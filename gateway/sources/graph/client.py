"""GraphClient: Microsoft Graph requests for one source over one aiohttp session, TLS verified (with the configured
CA bundle, if any), answers mapped into the gateway's error tree.

- At most ``max_per_mailbox`` requests in flight per mailbox (Outlook's limit is 4 per app and mailbox; the 5th gets
  429 ApplicationThrottled).
- ``429``/``503`` with ``Retry-After``: that mailbox's requests wait it out and retry; without one, and for other
  5xx answers and broken connections, exponential back-off. Throttling is per app *and mailbox*, so it is never a
  failure every room shares: when the retries are used up the request fails for its room alone
  (``MailboxThrottled``: the room's state ``throttled``).
- Every request passes the source's outage gate (sources/outage.py): a refused credential or an unreachable Graph
  costs one request, not one per room.
- ``403`` from an application access policy (or RBAC for Applications) is the room's misconfiguration, not worth a
  retry: ``ImpersonationDenied`` with key ``access_policy_denied`` and the PowerShell that fixes it.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
import structlog

from gateway.errors import (
    AccessDenied,
    AuthError,
    GatewayError,
    HttpError,
    ImpersonationDenied,
    MailboxNotFound,
    MailboxThrottled,
    NotFound,
    ProtocolError,
    RequestFailed,
    SyncStateInvalid,
    TlsError,
    UnknownHost,
    Unreachable,
)
from gateway.sources.graph.auth import TokenSource
from gateway.sources.graph.settings import GraphSettings
from gateway.sources.outage import OutageGate

log = structlog.get_logger("gateway.sources.graph")

BATCH_SIZE = 20  # Graph's limit of requests in one $batch
_POLICY_HINTS = ("accesspolicy", "access to odata is disabled", "raop", "rbac")
_SYNC_STATE_CODES = ("syncstatenotfound", "resyncrequired", "syncstateinvalid", "invaliddeltatoken")


def access_policy_remedy(mailbox: str, client_id: str) -> str:
    return (f"let the app reach the room: add {mailbox} to the mail-enabled security group of the application "
            f"access policy (New-ApplicationAccessPolicy -AppId {client_id} -PolicyScopeGroupId <group> "
            f"-AccessRight RestrictAccess), check it with Test-ApplicationAccessPolicy -Identity {mailbox} "
            f"-AppId {client_id}; changes can take an hour to apply")


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Mailbox:
    slots: asyncio.Semaphore
    until: float = 0.0  # monotonic time before which this mailbox's requests wait (Retry-After)


class GraphClient:
    def __init__(self, settings: GraphSettings, tokens: TokenSource, *,
                 on_call: Callable[[str, int], None] | None = None) -> None:
        self.settings = settings
        self.tokens = tokens
        self.on_call = on_call  # (operation, status) of every request sent (metrics, benchmarks)
        self.gate = OutageGate(retry_seconds=settings.outage_retry_seconds,
                               max_retry_seconds=settings.outage_max_retry_seconds,
                               auth_retry_seconds=settings.auth_retry_seconds,
                               auth_max_retry_seconds=settings.auth_max_retry_seconds)
        self._mailboxes: dict[str, _Mailbox] = {}
        self._session: aiohttp.ClientSession | None = None
        self.host = urlsplit(settings.graph_url).netloc
        self._prefer = {"Prefer": 'outlook.timezone="UTC", IdType="ImmutableId"'}  # batch members' own headers

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(cafile=self.settings.ca_bundle)
            # trust_env: an HTTPS_PROXY / NO_PROXY of the environment is used, as msal's requests session uses it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=100),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout), trust_env=True)
        return self._session

    async def close(self) -> None:
        self.tokens.close()
        if self._session is not None and not self._session.closed:
            await self._session.close()
            await asyncio.sleep(0.05)  # TLS transports finish closing on the next turns of the loop

    def url(self, path: str) -> str:
        return path if path.startswith("https://") or path.startswith("http://") else \
            self.settings.graph_url.rstrip("/") + path

    @staticmethod
    def user(mailbox: str) -> str:
        return f"/users/{quote(mailbox.lower(), safe='@')}"

    def _mailbox(self, mailbox: str) -> _Mailbox:
        found = self._mailboxes.get(mailbox)
        if found is None:
            found = self._mailboxes[mailbox] = _Mailbox(asyncio.Semaphore(self.settings.max_per_mailbox))
        return found

    async def _admit(self) -> bool:
        while True:
            probe = self.gate.admit_nowait()
            if probe is not None:
                return probe
            await asyncio.sleep(0.02)  # the very first request is out: its answer decides for all

    async def call(self, method: str, path: str, *, mailbox: str, operation: str, body: Any = None,
                   params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                   item: bool = False, delta: bool = False) -> Answer:
        """One request on behalf of ``mailbox``, retried as the module says. ``item``: the path names an item, so
        a 404 is that item gone (NotFound), not the mailbox; ``delta``: the path is a delta link, so a 410 or a
        rejected token is SyncStateInvalid."""
        s = self.settings
        box = self._mailbox(mailbox.lower())
        attempt = 0
        fresh_token = False
        while True:
            attempt += 1
            wait = box.until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            since = self.gate.outages
            probe = await self._admit()
            try:
                async with box.slots:
                    answer = await self._send(method, path, body, params, headers, operation)
                error = self._error(answer, mailbox, item, delta, operation)
            except GatewayError as e:
                self.gate.record(probe, e, since)
                if isinstance(e, Unreachable) and attempt < s.max_attempts and not isinstance(e, TlsError):
                    await asyncio.sleep(self._back_off(attempt))
                    continue
                raise
            if error is None:
                self.gate.record(probe, None, since)
                return answer
            if answer.status == 401 and not fresh_token:  # a token refused before its time: one new token, once
                fresh_token = True
                self.gate.record(probe, None, since)
                await asyncio.to_thread(self.tokens.forget)
                continue
            self.gate.record(probe, error, since)
            retry_after = _retry_after(answer)
            retryable = answer.status in (429, 503) or (answer.status >= 500 and answer.status != 501)
            if retryable and attempt < s.max_attempts and (retry_after or 0) <= s.max_retry_after:
                delay = retry_after if retry_after is not None else self._back_off(attempt)
                if answer.status in (429, 503):
                    if box.until < time.monotonic():  # once per episode, not per request of a storm
                        log.info("graph.throttled", mailbox=mailbox, status=answer.status, retry_after=delay,
                                 operation=operation)
                    box.until = max(box.until, time.monotonic() + delay)  # the mailbox's other requests wait too
                else:
                    await asyncio.sleep(delay)
                continue
            raise error

    async def pages(self, path: str, *, mailbox: str, operation: str, params: dict[str, str] | None = None,
                    headers: dict[str, str] | None = None, item: bool = False) -> list[dict[str, Any]]:
        """Every value of a collection, its @odata.nextLink followed to the last page (``params`` go with the first
        request only: a next link carries them)."""
        out: list[dict[str, Any]] = []
        link: str | None = path
        first = True
        while link:
            answer = await self.call("GET", link, mailbox=mailbox, operation=operation, headers=headers,
                                     params=params if first else None, item=item)
            first = False
            out += [v for v in answer.body.get("value") or () if isinstance(v, dict)]
            link = answer.body.get("@odata.nextLink")
        return out

    async def batch(self, gets: list[str], *, mailbox: str, operation: str) -> list[Answer | GatewayError]:
        """Several GETs of one mailbox in JSON ``$batch`` envelopes of 20 (one request instead of twenty): each
        member's answer, or its error as ``call`` would raise it (a member throttled, 429, is sent again after its
        Retry-After; the envelope itself is retried like any request)."""
        out: list[Answer | GatewayError | None] = [None] * len(gets)
        todo = list(range(len(gets)))
        for _ in range(self.settings.max_attempts):
            if not todo:
                break
            again: list[int] = []
            wait = 0.0
            for start in range(0, len(todo), BATCH_SIZE):
                chunk = todo[start:start + BATCH_SIZE]
                envelope = await self.call("POST", "/$batch", mailbox=mailbox, operation=f"batch:{operation}",
                                           body={"requests": [{"id": str(i), "method": "GET", "url": gets[i],
                                                               "headers": self._prefer} for i in chunk]})
                answered = {str(r.get("id")): r for r in envelope.body.get("responses") or ()
                            if isinstance(r, dict)}
                for i in chunk:
                    r = answered.get(str(i))
                    if r is None:
                        out[i] = ProtocolError(f"Graph's $batch answer left out a request for {mailbox}")
                        continue
                    body = r.get("body")
                    answer = Answer(int(r.get("status") or 0), body if isinstance(body, dict) else {},
                                    {str(k).lower(): str(v) for k, v in (r.get("headers") or {}).items()})
                    if answer.status in (429, 503):
                        again.append(i)
                        wait = max(wait, _retry_after(answer) or self._back_off(1))
                        continue
                    out[i] = self._error(answer, mailbox, True, False, operation) or answer
            todo = again
            if todo:
                await asyncio.sleep(min(wait, self.settings.max_retry_after))
        for i in todo:
            out[i] = MailboxThrottled(f"Graph throttled {operation} for {mailbox}")
        return [a if a is not None else ProtocolError("no answer") for a in out]

    def _back_off(self, attempt: int) -> float:
        return self.settings.back_off * 2 ** (attempt - 1) * (0.75 + random.random() / 2)

    async def _send(self, method: str, path: str, body: Any, params: dict[str, str] | None,
                    headers: dict[str, str] | None, operation: str) -> Answer:
        token = await self.tokens.token()
        url = self.url(path)
        sent = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
        try:
            async with self._http().request(method, url, json=body, params=params, headers=sent) as r:
                raw = await r.read()
                status, got = r.status, {k.lower(): v for k, v in r.headers.items()}
        except aiohttp.ClientConnectorCertificateError as e:
            raise TlsError(f"TLS with Graph at {self.host} failed: {e.certificate_error}", host=self.host,
                           remedy="check Graph's certificate, or give the CA that issued it in ca_bundle") from e
        except aiohttp.ClientSSLError as e:
            raise TlsError(f"TLS with Graph at {self.host} failed: {str(e)[:160]}", host=self.host) from e
        except aiohttp.ClientConnectorDNSError as e:
            raise UnknownHost(f"the host name {self.host} cannot be resolved", host=self.host,
                              remedy="check graph_url and the gateway's DNS") from e
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise Unreachable(f"cannot connect to Graph at {self.host}: {type(e).__name__} {str(e)[:120]}".rstrip(),
                              host=self.host,
                              remedy="check graph_url and that the gateway may reach it (proxy, firewall)") from e
        if self.on_call is not None:
            self.on_call(operation, status)
        parsed: dict[str, Any] = {}
        if raw:
            try:
                # orjson: less than half of json's CPU, which was an eighth of a Graph import's (a delta page carries
                # whole events, bodies and all: Graph takes no $select there); from the bytes, no text made first.
                loaded = orjson.loads(raw)
                parsed = loaded if isinstance(loaded, dict) else {"value": loaded}
            except ValueError:
                if status < 300:
                    raise HttpError(f"Graph at {self.host} answered {operation} with something other than JSON",
                                    host=self.host, status=status, remedy="check graph_url") from None
        return Answer(status, parsed, got)

    def _error(self, a: Answer, mailbox: str, item: bool, delta: bool, operation: str) -> GatewayError | None:
        if a.status < 400:
            return None
        err: dict[str, Any] = a.body["error"] if isinstance(a.body.get("error"), dict) else {}
        code = str(err.get("code") or "")
        message = str(err.get("message") or "")[:200]
        said = f"{a.status} {code}".strip() + (f": {message}" if message else "")
        low = f"{code} {message}".lower()
        if delta and (a.status == 410 or any(c in low for c in _SYNC_STATE_CODES) or a.status == 400):
            return SyncStateInvalid(f"Graph rejected the delta token of {mailbox} ({said})")
        if a.status == 401:
            return _own(AuthError(f"Graph refused the app's token ({said})", key="auth_required",
                                  remedy="check the app registration's application permissions "
                                         "(Calendars.ReadWrite, Place.Read.All) and that admin consent was granted"))
        if a.status == 403:
            if any(h in low for h in _POLICY_HINTS):
                # Graph's counterpart of EWS's impersonation scope: the same key and room state, its own remedy.
                return _own(ImpersonationDenied(f"an application access policy keeps the app from {mailbox} ({said})",
                                                remedy=access_policy_remedy(mailbox, self.settings.client_id)))
            return _own(AccessDenied(f"Graph refused {operation} for {mailbox} ({said})",
                                     remedy="grant the app registration the application permission "
                                            "Calendars.ReadWrite (and Place.Read.All) with admin consent"))
        if a.status == 404:
            if item and code not in ("ErrorInvalidUser", "MailboxNotEnabledForRESTAPI"):
                return NotFound(f"Graph has no such item in {mailbox} ({said})")
            return MailboxNotFound(f"Exchange Online has no mailbox {mailbox} ({said})",
                                   remedy="check the room's address, and that its mailbox lives in Exchange Online")
        if a.status in (429, 503):
            return MailboxThrottled(f"Graph throttled {operation} for {mailbox} ({said})")
        if a.status >= 500:
            return RequestFailed(f"Graph failed {operation} for {mailbox} ({said})")
        return ProtocolError(f"Graph refused {operation} for {mailbox} ({said})")


def _own(e: GatewayError) -> GatewayError:
    """An error whose remedy is the one for Graph (a room's state shows it rather than its state's general one)."""
    e.own_remedy = True
    return e


def _retry_after(a: Answer) -> float | None:
    value = a.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
