"""Microsoft Graph change notifications for gateways that have no inbound port (docs/relay-protocol.md §17).

Graph delivers webhooks only to a public HTTPS URL; the hub is public, the gateway is not. Each gateway gets two
URLs on the hub, ``/v1/graph/{route}/notifications`` and ``/v1/graph/{route}/lifecycle``, where ``route`` is an
unguessable token minted once per gateway (HubStore.graph_route) and told to it in ``welcome``. The routes take no
key (Graph cannot authenticate): the route is the capability, and the gateway checks the clientState it chose.

- The validation handshake (``?validationToken=...``) is answered at once, 200 ``text/plain`` with the decoded
  token, whether the gateway is connected or not (it is in the middle of creating the subscription).
- A delivery is answered 202 at once (Graph's deadline is 3 s) and sent down the gateway's tunnel as a
  ``notification`` message in the background; without a tunnel it is dropped and counted (the gateway polls by
  delta meanwhile and catches up when it reconnects).
- A token bucket per route answers floods 429 with Retry-After (Graph retries later; forged posts cost nothing).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiohttp import web

from gateway.hub.state import HubState
from gateway.relay import protocol
from gateway.web.problem import PROBLEM_JSON, document, problem

if TYPE_CHECKING:
    from gateway.hub.tunnels import Session

log = structlog.get_logger(__name__)

MAX_VALIDATION_TOKEN: Final = 1024  # Graph's tokens are a few hundred characters
ROUTE_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
SEND_TIMEOUT: Final = 10.0  # a tunnel that cannot take a frame in this long is stuck; the heartbeat ends it


def graph_urls(base: str, route: str) -> dict[str, str]:
    """The ``notifications`` field of ``welcome``: the gateway's two URLs at the hub whose public URL is ``base``."""
    path = base.rstrip("/") + protocol.GRAPH_PATH.format(route=route)
    return {"url": path + "notifications", "lifecycle_url": path + "lifecycle"}


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens
        self.updated = time.monotonic()


class GraphNotifications:
    """The two public routes per gateway, the rate limit, and the forwarding."""

    def __init__(self, state: HubState) -> None:
        self.state = state
        self._buckets: dict[str, _Bucket] = {}  # known routes only: bounded by the number of gateways
        self._sends: set[asyncio.Task[None]] = set()

    async def notifications(self, request: web.Request) -> web.StreamResponse:
        return await self._post(request, lifecycle=False)

    async def lifecycle(self, request: web.Request) -> web.StreamResponse:
        return await self._post(request, lifecycle=True)

    async def close(self) -> None:
        tasks = list(self._sends)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _post(self, request: web.Request, *, lifecycle: bool) -> web.StreamResponse:
        outcomes = self.state.metrics.graph_notifications
        route = request.match_info["route"]
        gateway_id = (await self.state.read(self.state.store.gateway_for_graph_route, route)
                      if ROUTE_RE.fullmatch(route) else None)
        if gateway_id is None:
            outcomes.labels("unknown_route").inc()
            raise problem(404, "unknown_route", "no gateway receives Graph notifications at this URL (the route is "
                                                "unknown or its gateway was revoked)")
        token = request.query.get("validationToken")
        if token is not None:
            if not token or len(token) > MAX_VALIDATION_TOKEN:
                outcomes.labels("invalid").inc()
                raise problem(400, "invalid_validation_token", f"validationToken must be 1 to "
                                                               f"{MAX_VALIDATION_TOKEN} characters")
            outcomes.labels("validation").inc()
            log.info("hub.graph_validation", gateway_id=gateway_id, lifecycle=lifecycle)
            return web.Response(text=token, content_type="text/plain")
        wait = self._admit(route)
        if wait:
            outcomes.labels("rate_limited").inc()
            raise problem(429, "rate_limited", "too many notifications for this gateway; retry later",
                          headers={"Retry-After": str(math.ceil(wait))})
        body = await self._body(request)
        session = self.state.sessions.get(gateway_id)
        if session is None:
            outcomes.labels("dropped_offline").inc()
            log.debug("hub.graph_dropped_offline", gateway_id=gateway_id, lifecycle=lifecycle)
            return web.Response(status=202)
        text = protocol.encode("notification", lifecycle=lifecycle, body=body)
        task = asyncio.get_running_loop().create_task(self._forward(session, gateway_id, text),
                                                      name=f"graph-forward:{gateway_id}")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return web.Response(status=202)

    def _admit(self, route: str) -> float:
        """0 when a post on ``route`` may pass now (and it is counted), else the seconds until one may."""
        s = self.state.settings
        bucket = self._buckets.get(route)
        if bucket is None:
            bucket = self._buckets[route] = _Bucket(float(s.graph_burst))
        now = time.monotonic()
        bucket.tokens = min(float(s.graph_burst), bucket.tokens + (now - bucket.updated) * s.graph_rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / s.graph_rate

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """What Graph posted: a JSON object with a ``value`` list, at most MAX_NOTIFICATION_BYTES."""
        limit = protocol.MAX_NOTIFICATION_BYTES
        if request.content_length is not None and request.content_length > limit:
            raise self._too_large(request.content_length)
        data = bytearray()
        while chunk := await request.content.readany():  # not request.read(): its cap is the command size
            data += chunk
            if len(data) > limit:
                raise self._too_large(len(data))
        try:
            body = protocol.loads(bytes(data))
        except ValueError as e:
            body, error = None, str(e)
        else:
            error = "it is not a JSON object with a 'value' list"
        if not isinstance(body, dict) or not isinstance(body.get("value"), list):
            self.state.metrics.graph_notifications.labels("invalid").inc()
            raise problem(400, "invalid_notification", f"this is not a Graph change notification: {error[:200]}")
        return body

    def _too_large(self, size: int) -> web.HTTPException:
        self.state.metrics.graph_notifications.labels("invalid").inc()
        limit = protocol.MAX_NOTIFICATION_BYTES
        text = json.dumps(document(413, "too_large", f"a notification may be at most {limit} bytes"))
        return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, text=text, content_type=PROBLEM_JSON)

    async def _forward(self, session: Session, gateway_id: str, text: str) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await session.send(text)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            self.state.metrics.graph_notifications.labels("dropped_offline").inc()
            log.info("hub.graph_forward_failed", gateway_id=gateway_id, error=f"{e.__class__.__name__}: {e}"[:200])
            return
        self.state.metrics.graph_notifications.labels("forwarded").inc()

