"""The event stream (Server-Sent Events) both APIs serve, on aiohttp-sse.

    retry: 2000

    id: 1181
    event: com.exchangegateway.booking.created.v1
    data: {"specversion":"1.0",...}

    : ping

A client resumes with ``Last-Event-ID`` (or ``?after=``): the stream sends what came after that id, then what
comes live. Before the stream opens, ``resume_point`` refuses a malformed id (400 invalid_last_event_id) and one
past the stream's end (409 last_event_id_ahead, with the id to resume from): waiting for it would skip every event
until then, silently. The replay reads and encodes one page (``PAGE`` events) at a time in the application's reader
thread and writes it at once, so hundreds of clients replaying at once hold a page of text each, whatever the
backlog (``send()`` per event would cost the event loop an await per event). aiohttp-sse sends the ping every
``keepalive`` seconds and notices a client that went away (or stalls) by it; between pages and wake-ups the stream
asks ``still_authorized`` every ``keepalive`` seconds, so a revoked key's stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.errors import ProtocolError
from gateway.relay import protocol
from gateway.web.problem import problem

PAGE: Final = 100  # events read and encoded at once per stream
RETRY_MS: Final = 2000  # how long a disconnected client waits before it reconnects
SEND_TIMEOUT: Final = 120.0  # a client that takes longer to accept one event is gone


@dataclass(frozen=True, slots=True)
class Page:
    """Events after some id, encoded for the stream (in the application's reader thread)."""

    text: bytes
    last: int  # the id of the last event (the id asked after, when there were none)
    count: int


def page_of(events: Iterable[tuple[int, str, str]], after: int) -> Page:
    """(id, type, data) of each event -> a page; ``data`` is one line of JSON."""
    parts: list[str] = []
    last = after
    for event_id, event_type, data in events:
        parts.append(f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n")
        last = event_id
    return Page("".join(parts).encode(), last, len(parts))


def resume_point(request: web.Request) -> int:
    """The id the client resumes after (0: from the start); 400 invalid_last_event_id when it is not an id."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    try:
        return protocol.parse_event_id(raw)
    except ProtocolError as e:
        raise problem(400, e.key, str(e)) from None


def refuse_ahead(after: int, last: int) -> None:
    """409 last_event_id_ahead when ``after`` lies past the stream's last event ``last``."""
    if after > last:
        doc = protocol.event_id_ahead(after, last)
        raise problem(409, doc.pop("error"), doc.pop("message"), **doc)


async def stream(request: web.Request, after: int, *, read_page: Callable[[int], Awaitable[Page]],
                 wake: asyncio.Event, keepalive: float,
                 still_authorized: Callable[[], Awaitable[bool]] | None = None,
                 closing: Callable[[], bool] = lambda: False) -> web.StreamResponse:
    """Serve the events after ``after`` until the client goes, the application closes (``closing()`` and a set
    ``wake``), the task is cancelled or the key is revoked. ``wake`` is set when new events may be there."""
    resp = EventSourceResponse(sep="\n", ping_interval=keepalive, send_timeout=SEND_TIMEOUT)
    await resp.prepare(request)
    gone = asyncio.ensure_future(resp.wait())  # done when a ping fails: the client went away
    recheck_at = time.monotonic() + keepalive
    try:
        await resp.write(f"retry: {RETRY_MS}\n\n".encode())
        while not closing() and not gone.done():
            wake.clear()  # before reading: an event stored after the read sets it again
            if still_authorized is not None and time.monotonic() >= recheck_at:
                if not await still_authorized():  # however busy the stream: a revoked key's stream ends
                    break
                recheck_at = time.monotonic() + keepalive
            page = await read_page(after)
            if page.count:
                await _write(request, resp, page.text)
            after = page.last
            if page.count == PAGE:
                continue
            waiting = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait((waiting, gone), timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
    except (ConnectionResetError, TimeoutError):
        pass  # the client went away, or stalled (aiohttp-sse aborted the connection)
    finally:
        if resp.is_connected():
            resp.stop_streaming()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    return resp


async def _write(request: web.Request, resp: EventSourceResponse, text: bytes) -> None:
    """A page at once, as aiohttp-sse writes an event: a client that takes longer than SEND_TIMEOUT is gone."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await resp.write(text)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # a stalled peer never drains the buffer: a graceful close would hang
        raise
