"""What requests carry, read the same way by both APIs: times and ranges in the query, rooms, bounded JSON bodies.

Each refusal is a 400 problem that names the parameter and an example of what it takes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from gateway.relay import protocol
from gateway.web.problem import problem

MAX_RANGE: Final = timedelta(days=731)  # bookings: two years
EXAMPLE_TIME: Final = "2026-11-23T08:00:00Z"


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise problem(400, "invalid_time", f"{name} must be an ISO 8601 date-time, e.g. {EXAMPLE_TIME}") from None
    if parsed.tzinfo is None:
        raise problem(400, "invalid_time", f"{name} needs a time zone offset or Z")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise problem(400, "invalid_time", f"{name} lies beyond the dates the gateway can hold") from None


def time_range(request: web.Request, *, default_days: int, limit: timedelta = MAX_RANGE) -> tuple[datetime, datetime]:
    """``?start=&end=``: default from now for ``default_days``; end after start, at most ``limit`` apart."""
    start = parse_time(request.query.get("start"), "start", datetime.now(UTC).replace(microsecond=0))
    try:
        fallback = start + timedelta(days=default_days)
    except OverflowError:
        fallback = datetime.max.replace(tzinfo=UTC)
    end = parse_time(request.query.get("end"), "end", fallback)
    if end <= start:
        raise problem(400, "invalid_range", "end must be after start")
    if end - start > limit:
        raise problem(400, "invalid_range", f"the range may span at most {limit.days} days")
    return start, end


def rooms_param(request: web.Request) -> list[str]:
    """``?rooms=a@x,b@x``: 1 to protocol.MAX_AVAILABILITY_ROOMS addresses, lower-cased."""
    rooms = [r.strip().lower() for r in request.query.get("rooms", "").split(",") if r.strip()]
    if not rooms or len(rooms) > protocol.MAX_AVAILABILITY_ROOMS:
        raise problem(400, "invalid_rooms", f"give 1 to {protocol.MAX_AVAILABILITY_ROOMS} rooms as "
                                            "?rooms=a@example.com,b@example.com")
    return rooms


def availability_query(request: web.Request) -> tuple[list[str], datetime, datetime]:
    """GET .../availability: the rooms and [start, end) (default: a day from now; at most 42 days)."""
    rooms = rooms_param(request)
    start, end = time_range(request, default_days=1, limit=protocol.MAX_AVAILABILITY_RANGE)
    return rooms, start, end


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is longer than ``limit`` (the rest is never buffered)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: web.Request, *, optional: bool = False,
                      limit: int = protocol.MAX_COMMAND_BYTES) -> dict[str, Any]:
    """The body as a JSON object (400 invalid_json otherwise; 413 too_large above ``limit``)."""
    if optional and not request.can_read_body:
        return {}
    raw = await read_limited(request, limit)
    if raw is None:
        raise problem(413, "too_large", f"the request body may be at most {limit} bytes")
    try:
        body = protocol.loads(raw)
    except ValueError as e:
        raise problem(400, "invalid_json", f"the request body must be a JSON object: {e}") from None
    if not isinstance(body, dict):
        raise problem(400, "invalid_json", "the request body must be a JSON object")
    return body
