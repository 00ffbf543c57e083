"""The routes of the booking API, which the local API serves under ``/v1`` and the hub under
``/v1/customers/{customer}``: the same paths below the prefix, the same parameters, the same answers.

A ``Route`` names the handler that serves it (a method of the application's API object, also the aiohttp route
name), the scopes a caller needs (None: open; see gateway/web/auth.py) and its OpenAPI operation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from gateway.relay import protocol

PROBLEM: Final = {"$ref": "#/components/responses/Problem"}
TIME: Final = {"type": "string", "format": "date-time"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    method: str
    path: str
    scopes: tuple[str, ...] | None  # None: open to anyone; () any valid key
    operation: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def scope(self) -> str | None:
        """The scope the route is known by (the first one)."""
        return self.scopes[0] if self.scopes else None

    def under(self, prefix: str, *, scopes: tuple[str, ...] = (), params: Iterable[dict[str, Any]] = (),
              note: str = "") -> Route:
        """This route below ``prefix``, needing ``scopes`` besides its own, with more path ``params`` and a
        ``note`` added to its description."""
        op = dict(self.operation)
        op["parameters"] = [*params, *op.get("parameters", [])]
        if note:
            op["description"] = f"{op.get('description', '')} {note}".strip()
        return replace(self, path=prefix + self.path, scopes=(*(self.scopes or ()), *scopes), operation=op)


EVENTS_DESCRIPTION: Final = (
    "Each event's SSE id is its position in this stream; reconnect with Last-Event-ID (or ?after=) to resume after "
    "the last event you processed. Delivery is at-least-once; events of one room arrive in order; a CloudEvent id "
    "never changes, so duplicates can be dropped. A comment line (': ping') comes every 15 seconds. A Last-Event-ID "
    "past the last event is refused (409 last_event_id_ahead, with the stream's last_event_id): the store was reset "
    "or restored since, so read the rooms and bookings again and resume from that id; a malformed one is 400 "
    "invalid_last_event_id.")

COMMAND_DESCRIPTION: Final = (
    "create, update, cancel, decline, resync or availability. Every command carries an idempotency key: retrying "
    "the same key (after a timeout, a crash, a lost answer) never books twice and returns the same outcome. The "
    "answer is always a command result: 200 when the gateway decided (accepted; declined with a reason code; failed "
    "with retryable true or false), 400 invalid_command/unsupported_command (nothing was done), 409 "
    "idempotency_conflict, 413 too_large, 503/504 gateway_offline (retry the same key).")

BOOKING_ROUTES: Final = (
    Route("rooms", "GET", "/rooms", ("read",), {
        "summary": "The rooms and their state", "operationId": "listRooms",
        "responses": {"200": json_body(ref("RoomList"), "the rooms")}}),
    Route("bookings", "GET", "/rooms/{room}/bookings", ("read",), {
        "summary": "A room's bookings overlapping [start, end)", "operationId": "listBookings",
        "parameters": [
            {"name": "room", "in": "path", "required": True, "schema": {"type": "string", "format": "email"}},
            {"name": "start", "in": "query", "schema": TIME, "description": "default: now"},
            {"name": "end", "in": "query", "schema": TIME,
             "description": "default: start + 7 days; at most two years after start"}],
        "responses": {"200": json_body(ref("BookingList"), "the bookings"), "400": PROBLEM, "404": PROBLEM}}),
    Route("events", "GET", "/events", ("read",), {
        "summary": "Booking events as Server-Sent Events (CloudEvents 1.0 JSON in each data field)",
        "operationId": "streamEvents", "description": EVENTS_DESCRIPTION,
        "parameters": [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                       {"name": "after", "in": "query", "schema": {"type": "integer"}}],
        "responses": {"200": {"description": "the stream", "content": {"text/event-stream": {
            "schema": {"type": "string"}}}}, "400": PROBLEM, "409": PROBLEM}}),
    Route("availability", "GET", "/availability", ("read",), {
        "summary": "Busy times of rooms in [start, end)", "operationId": "getAvailability",
        "parameters": [
            {"name": "rooms", "in": "query", "required": True, "schema": {"type": "string"},
             "description": f"room addresses, comma-separated (1 to {protocol.MAX_AVAILABILITY_ROOMS})"},
            {"name": "start", "in": "query", "schema": TIME, "description": "default: now"},
            {"name": "end", "in": "query", "schema": TIME,
             "description": f"default: start + 1 day; at most {protocol.MAX_AVAILABILITY_RANGE.days} days after "
                            "start"}],
        "responses": {"200": json_body(ref("Availability"), "busy times per room"), "400": PROBLEM,
                      "403": PROBLEM, "404": PROBLEM, "422": PROBLEM, "429": PROBLEM, "503": PROBLEM}}),
    Route("command", "POST", "/commands", ("book",), {
        "summary": "Execute a booking command", "operationId": "executeCommand", "description": COMMAND_DESCRIPTION,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("Command")}},
                        "description": f"at most {protocol.MAX_COMMAND_BYTES} bytes"},
        "responses": {
            "200": json_body(ref("CommandResult"), "the command's outcome"),
            "400": json_body(ref("CommandResult"), "failed invalid_command or unsupported_command: not a valid "
                                                   "command (bad JSON, schema, times in the past or reversed); "
                                                   "nothing was done"),
            "409": json_body(ref("CommandResult"), "failed idempotency_conflict"),
            "413": json_body(ref("CommandResult"), "failed too_large"),
            "503": {"description": "failed gateway_offline: retry the same key later (the hub); a problem when the "
                                   "gateway's commands are disabled (commands_disabled)",
                    "content": {"application/json": {"schema": ref("CommandResult")},
                                "application/problem+json": {"schema": ref("Problem")}}},
            "504": json_body(ref("CommandResult"), "failed gateway_offline: no answer in time; retry the same key")}}),
)
