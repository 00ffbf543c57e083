"""Bearer keys with scopes: one middleware for the local API's keys and the hub's customer keys and admin token.

Each route names the scopes a caller needs (``RouteScopes``: by method and path template; a scope may name a path
parameter, ``customer:{customer}``, which the request fills in). The application brings a ``KeyChecker`` that
turns a token into a ``Principal`` (who is calling and what they may do) or a refusal reason, and the words of
its refusals (``AuthTexts``). Refusals are problem documents with a ``WWW-Authenticate`` challenge (RFC 6750):

    401 missing_api_key      no Authorization header
    401 invalid_api_key      not a Bearer token, or not a key this server knows
    401 revoked_api_key      the key was revoked
    403 insufficient_scope   the key is valid but lacks a scope the route needs
    503 <store key>          the keys cannot be checked right now

A path under a ``protected`` prefix that matches no route needs a valid key too (any key gets its 404; nobody
else learns which paths exist). Refusals are counted (``on_refused``) and logged once per client and reason per
minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError
from gateway.web.problem import problem

log = structlog.get_logger(__name__)

REFUSAL_LOG_SECONDS: Final = 60.0  # one log line per refused client and reason per minute; the metric counts all
Reason = Literal["missing", "malformed", "unknown", "revoked", "scope"]
RouteScopes = Mapping[tuple[str, str], tuple[str, ...]]  # (method, path template) -> the scopes it needs


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: ``id`` is safe to log (a key id, never a secret)."""

    id: str
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a token is: a principal, or why it is refused."""

    principal: Principal | None
    reason: Literal["ok", "malformed", "unknown", "revoked"] = "ok"
    key_id: str | None = None  # of a refused token shaped like a key: which client to fix


class KeyChecker(Protocol):
    async def check(self, token: str) -> Verdict:
        """Raise GatewayError when the keys cannot be read now (answered 503)."""


@dataclass(frozen=True, slots=True)
class AuthTexts:
    realm: str
    missing: str  # no key at all
    invalid: str  # an unknown or malformed key
    revoked: str
    lacking: Callable[[str, Principal], str]  # (the scope lacked, the caller) -> what to do


PRINCIPAL: Final = web.RequestKey("principal", Principal)


class BearerAuth:
    def __init__(self, checker: KeyChecker, scopes: RouteScopes, texts: AuthTexts, *, area: str,
                 protected: Collection[str] = ("/v1/",), on_refused: Callable[[Reason], None] | None = None) -> None:
        self.checker = checker
        self.scopes = scopes
        self.texts = texts
        self.area = area  # the log event's prefix: api.auth_refused, hub.auth_refused
        self.protected = tuple(protected)
        self.on_refused = on_refused
        self._logged: dict[tuple[str, str], float] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = self.needed(request)
        if needed is not None:
            request[PRINCIPAL] = await self.authorize(request, needed)
        return await handler(request)

    def needed(self, request: web.Request) -> tuple[str, ...] | None:
        """The scopes this request needs (empty: any valid key), or None when it is open."""
        method = "GET" if request.method == "HEAD" else request.method
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else None
        if template is not None and (method, template) in self.scopes:
            return tuple(s.format_map(request.match_info) for s in self.scopes[(method, template)])
        return () if request.path.startswith(self.protected) else None

    async def authorize(self, request: web.Request, needed: tuple[str, ...]) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if not header:
            raise self._refuse(request, "missing", "missing_api_key", self.texts.missing)
        if scheme.lower() != "bearer" or not token:
            raise self._refuse(request, "malformed", "invalid_api_key",
                               "send the key as 'Authorization: Bearer <key>'")
        verdict = await self._check(token)
        who = verdict.principal
        if who is None:
            if verdict.reason == "revoked":
                raise self._refuse(request, "revoked", "revoked_api_key", self.texts.revoked, verdict.key_id)
            reason: Reason = "malformed" if verdict.reason == "malformed" else "unknown"
            raise self._refuse(request, reason, "invalid_api_key", self.texts.invalid, verdict.key_id)
        for scope in needed:
            if scope not in who.scopes:
                raise self._refuse(request, "scope", "insufficient_scope", self.texts.lacking(scope, who), who.id,
                                   scope=scope)
        return who

    async def still_authorized(self, request: web.Request) -> bool:
        """For long-lived streams: the caller's key has not been revoked since the stream began."""
        if request.get(PRINCIPAL) is None:
            return True
        token = request.headers.get("Authorization", "").strip().partition(" ")[2].strip()
        try:
            return (await self.checker.check(token)).principal is not None
        except GatewayError:
            return True  # the store is busy: keep the stream; the next check decides

    async def _check(self, token: str) -> Verdict:
        try:
            return await self.checker.check(token)
        except GatewayError as e:
            log.warning(f"{self.area}.keys_unavailable", key=e.key, error=str(e))
            raise problem(503, e.key, f"API keys cannot be checked right now: {e}") from None

    def _refuse(self, request: web.Request, reason: Reason, code: str, message: str, key_id: str | None = None,
                *, scope: str | None = None) -> web.HTTPException:
        if self.on_refused is not None:
            self.on_refused(reason)
        who = key_id or request.remote or "?"
        now = time.monotonic()
        if now - self._logged.get((reason, who), -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[(reason, who)] = now
            log.info(f"{self.area}.auth_refused", reason=reason, key_id=key_id, remote=request.remote,
                     method=request.method, path=request.path)
        realm = f'Bearer realm="{self.texts.realm}"'
        if reason == "scope":
            challenge = f'{realm}, error="insufficient_scope", scope="{scope}"'
        elif reason == "missing":
            challenge = realm
        else:
            challenge = f'{realm}, error="invalid_token"'
        status = 403 if reason == "scope" else 401
        return problem(status, code, message, headers={"WWW-Authenticate": challenge})
