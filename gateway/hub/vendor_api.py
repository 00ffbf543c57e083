"""The vendor's API, one customer per key: the booking API of gateway/web/routes.py under
``/v1/customers/{customer}`` — rooms, bookings and availability from the events stored so far, the event stream,
and commands forwarded to the customer's gateway."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.hub.forwarding import Forwarder
from gateway.hub.state import HubState
from gateway.model import CommandResult
from gateway.web import commands as command_answers
from gateway.web import sse
from gateway.web.params import availability_query, iso, time_range
from gateway.web.problem import problem

log = structlog.get_logger(__name__)

SSE_PAGE = sse.PAGE  # stored events read and encoded at once per stream


class VendorApi:
    def __init__(self, state: HubState, forwarder: Forwarder) -> None:
        self.state = state
        self.forwarder = forwarder

    async def rooms(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        rooms = await self.state.read(self.state.store.rooms, customer)
        live = {s.gateway_id for s in self.state.sessions.values() if s.customer == customer}
        for r in rooms:
            r["gateway_connected"] = r.pop("gateway_id") in live
        return web.json_response({"rooms": rooms})

    async def bookings(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        room = request.match_info["room"].lower()
        if not await self.state.read(self.state.store.has_room, customer, room):
            raise _room_unknown(customer, room)
        start, end = time_range(request, default_days=7)
        items = await self.state.read(self.state.store.bookings, customer, room, start, end)
        return web.json_response({"room": room, "start": iso(start), "end": iso(end), "bookings": items})

    async def availability(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        rooms, start, end = availability_query(request)
        busy = await self.state.read(self.state.store.busy, customer, rooms, start, end)
        return web.json_response({"start": iso(start), "end": iso(end), "rooms": busy})

    async def events(self, request: web.Request) -> web.StreamResponse:
        customer = request.match_info["customer"]
        after = sse.resume_point(request)
        record = await self.state.read(self.state.store.customer, customer)
        sse.refuse_ahead(after, record.last_seq if record is not None else 0)
        wake = self.state.subscribe(customer)
        try:
            return await sse.stream(request, after, read_page=lambda n: self.state.read(self._sse_page, customer, n),
                                    wake=wake, keepalive=self.state.settings.sse_keepalive,
                                    closing=lambda: self.state.closing)
        finally:
            self.state.unsubscribe(customer, wake)

    def _sse_page(self, customer: str, after: int) -> sse.Page:
        """In a reader thread: the customer's events after ``after``, one page."""
        return sse.page_of(((e.seq, e.type, e.body) for e in self.state.store.events_after(customer, after, SSE_PAGE)),
                           after)

    async def command(self, request: web.Request) -> web.Response:
        customer = request.match_info["customer"]
        cmd = await command_answers.read_command(request)
        if isinstance(cmd, CommandResult):
            status, result = command_answers.status_of(cmd), cmd
        else:
            status, result = await self.forwarder.run_command(customer, cmd)
        self.state.metrics.command(result)
        return command_answers.answer(result, status)


def _room_unknown(customer: str, room: str) -> web.HTTPException:
    return problem(404, "room_unknown", f"no gateway of {customer!r} has relayed the room {room}; see GET "
                                        f"/v1/customers/{customer}/rooms")
