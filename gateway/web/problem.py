"""Error answers as RFC 9457 problem details (``application/problem+json``).

    {"type": "https://exchange-gateway.dev/problems/room_unknown", "title": "Room unknown", "status": 404,
     "detail": "no room x@y is connected; see GET /v1/rooms", "error": "room_unknown", "message": "..."}

``error`` (the stable code) and ``message`` (= ``detail``) are what clients read before problem details; they
stay. Extension members (``retryable``, ``last_event_id``) sit beside them. ``problem_middleware`` gives every
error answer this shape: a ``problem()`` raised by a handler, a GatewayError that escapes one (its status from the
application's table), and aiohttp's own 404/405/413.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import GatewayError

log = structlog.get_logger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://exchange-gateway.dev/problems/"
_KEPT_HEADERS: Final = ("allow", "www-authenticate", "retry-after")
_CLASSES: Final[dict[int, type[web.HTTPException]]] = {
    cls.status_code: cls for cls in (
        web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden, web.HTTPNotFound, web.HTTPConflict,
        web.HTTPGone, web.HTTPRequestEntityTooLarge, web.HTTPMisdirectedRequest, web.HTTPUnprocessableEntity,
        web.HTTPTooManyRequests,
        web.HTTPInternalServerError, web.HTTPServiceUnavailable, web.HTTPGatewayTimeout)}


def document(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The problem document: the RFC 9457 members, our stable code and message, and any extension members."""
    return {"type": TYPE_BASE + code, "title": code.replace("_", " ").capitalize(), "status": status,
            "detail": detail, "error": code, "message": detail, **extra}


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
            **extra: Any) -> web.HTTPException:
    """An error answer to raise from a handler (a 4xx or 5xx status this module knows)."""
    cls = _CLASSES[status]
    body = json.dumps(document(status, code, detail, **extra))
    if cls is web.HTTPRequestEntityTooLarge:  # its constructor wants the sizes only for a text of its own
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=body, content_type=PROBLEM_JSON,
                                             headers=headers)
    return cls(text=body, content_type=PROBLEM_JSON, headers=headers)


def problem_middleware(status_of: Callable[[GatewayError], int] | None = None) -> Middleware:
    """Every error answer as a problem document. ``status_of``: the status of a GatewayError that escapes a
    handler (default: 500, logged)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as e:
            status = status_of(e) if status_of is not None else 500
            if status >= 500:
                log.warning("http.error", path=request.path, key=e.key, error=str(e))
            raise problem(status, e.key, str(e)) from None
        except web.HTTPException as e:
            if e.status < 400 or e.content_type == PROBLEM_JSON:
                raise
            # aiohttp's own answers (no route, wrong method, body too large): the same shape as ours
            code = (e.reason or HTTPStatus(e.status).phrase).lower().replace(" ", "_")
            kept = {k: v for k, v in e.headers.items() if k.lower() in _KEPT_HEADERS}
            return web.Response(status=e.status, text=json.dumps(document(e.status, code, e.reason)),
                                content_type=PROBLEM_JSON, headers=kept)
    return middleware
