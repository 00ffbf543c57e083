"""The local HTTP API: rooms, bookings, the event stream (SSE, resumable), OpenAPI, metrics and health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.model import to_json
from gateway.observability.metrics import Metrics
from gateway.ports import OutboxEntry, Store

SSE_BATCH = 500
SSE_KEEPALIVE_SECONDS = 15.0
MAX_RANGE = timedelta(days=731)


class EventHub:
    """Wakes SSE streams when the coordinator commits new outbox entries."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self, entries: list[OutboxEntry] | None = None) -> None:
        for w in list(self._waiters):
            w.set()

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._waiters.discard(ev)


class Api:
    def __init__(self, store: Store, metrics: Metrics, hub: EventHub, *,
                 room_states: Callable[[], dict[str, dict[str, Any]]], ready: Callable[[], bool]) -> None:
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.room_states = room_states
        self.ready = ready
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="api-read")

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(*args))

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/rooms", self.rooms),
            web.get("/v1/rooms/{room}/bookings", self.bookings),
            web.get("/v1/events", self.events),
            web.get("/openapi.json", self.openapi),
            web.get("/metrics", self.prometheus),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ]

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    async def rooms(self, request: web.Request) -> web.Response:
        stored = {r.email: r for r in await self._read(self.store.rooms)}
        live = self.room_states()
        out = []
        for email in sorted(set(stored) | set(live)):
            r = stored.get(email)
            info = live.get(email, {})
            out.append({
                "email": email,
                "state": info.get("state") or (r.state if r else "pending"),
                "reason": info.get("reason") or (r.reason if r else ""),
                "remedy": info.get("remedy") or (r.remedy if r else ""),
                "last_sync_age_seconds": info.get("last_sync_age_seconds"),
            })
        return web.json_response({"rooms": out})

    async def bookings(self, request: web.Request) -> web.Response:
        room = request.match_info["room"].lower()
        known = {r.email for r in await self._read(self.store.rooms)} | set(self.room_states())
        if room not in known:
            raise _problem(404, "room_unknown", f"no room {room} is connected; see GET /v1/rooms")
        now = datetime.now(UTC)
        start = _parse_time(request.query.get("start"), "start", now)
        end = _parse_time(request.query.get("end"), "end", start + timedelta(days=7))
        if end <= start:
            raise _problem(400, "invalid_range", "end must be after start")
        if end - start > MAX_RANGE:
            raise _problem(400, "invalid_range", "the range may span at most two years")
        items = await self._read(self.store.bookings, room, start, end)
        return web.json_response({"room": room, "start": _iso(start), "end": _iso(end),
                                  "bookings": [to_json(b) for b in items]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        try:
            after = int(raw)
        except ValueError:
            raise _problem(400, "invalid_cursor", "Last-Event-ID must be the id of an event from this stream") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        wake = self.hub.subscribe()
        try:
            await resp.write(b"retry: 2000\n\n")
            while True:
                wake.clear()
                entries: list[OutboxEntry] = await self._read(self.store.outbox_after, after, SSE_BATCH)
                if entries:
                    chunk = []
                    for e in entries:
                        payload = json.dumps(e.event.to_cloudevent(), separators=(",", ":"))
                        chunk.append(f"id: {e.seq}\nevent: {e.event.type}\ndata: {payload}\n\n")
                        after = e.seq
                    await resp.write("".join(chunk).encode())
                    if len(entries) == SSE_BATCH:
                        continue
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (shutdown).
                    async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                        await wake.wait()
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.unsubscribe(wake)
        return resp

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        ok = self.ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)


def _problem(status: int, code: str, detail: str) -> web.HTTPException:
    body = json.dumps({"error": code, "detail": detail})
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}.get(status, web.HTTPBadRequest)
    return cls(text=body, content_type="application/json")


def _parse_time(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        example = "2026-11-23T08:00:00Z"
        raise _problem(400, "invalid_time", f"{name} must be an ISO 8601 date-time, e.g. {example}") from None
    if parsed.tzinfo is None:
        raise _problem(400, "invalid_time", f"{name} needs a time zone offset or Z")
    return parsed.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_BOOKING_REF = {"$ref": "#/components/schemas/Booking"}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Exchange room gateway — local API", "version": __version__,
             "description": "Rooms, bookings and the booking event stream of one gateway."},
    "paths": {
        "/v1/rooms": {"get": {"summary": "Connected rooms and their state", "responses": {"200": {
            "description": "rooms", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"rooms": {"type": "array", "items": {
                    "$ref": "#/components/schemas/Room"}}}}}}}}}},
        "/v1/rooms/{room}/bookings": {"get": {
            "summary": "A room's bookings overlapping [start, end)",
            "parameters": [
                {"name": "room", "in": "path", "required": True, "schema": {"type": "string", "format": "email"}},
                {"name": "start", "in": "query", "schema": {"type": "string", "format": "date-time"},
                 "description": "default: now"},
                {"name": "end", "in": "query", "schema": {"type": "string", "format": "date-time"},
                 "description": "default: start + 7 days; at most two years after start"}],
            "responses": {
                "200": {"description": "bookings", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"bookings": {"type": "array", "items": _BOOKING_REF}}}}}},
                "400": {"$ref": "#/components/responses/Problem"},
                "404": {"$ref": "#/components/responses/Problem"}}}},
        "/v1/events": {"get": {
            "summary": "Booking events as Server-Sent Events (CloudEvents 1.0 JSON in each data field)",
            "description": "Each event's SSE id is its outbox sequence; reconnect with Last-Event-ID to resume "
                           "after the last event you processed. Delivery is at-least-once; events of one room "
                           "arrive in order; a CloudEvent id never changes, so duplicates can be dropped.",
            "parameters": [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                           {"name": "after", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the stream", "content": {"text/event-stream": {}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness", "responses": {"200": {"description": "ready"},
                                                                   "503": {"description": "not ready"}}}},
    },
    "components": {
        "schemas": {
            "Room": {"type": "object", "properties": {
                "email": {"type": "string"}, "state": {"type": "string"}, "reason": {"type": "string"},
                "remedy": {"type": "string"}, "last_sync_age_seconds": {"type": ["number", "null"]}}},
            "Booking": {"$ref": "https://exchange-gateway.dev/schemas/booking.v1.json"},
        },
        "responses": {"Problem": {"description": "what went wrong and what to do", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "error": {"type": "string"}, "detail": {"type": "string"}}}}}}},
    },
}
