"""The OpenAPI 3.1 document of an API built from its routes (gateway/web/routes.py): the local API's and the
hub's come from the same routes, schemas and security scheme, so what they share is documented once."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from gateway.web.problem import PROBLEM_JSON
from gateway.web.routes import TIME, Route, ref


def packaged_schema(name: str) -> dict[str, Any]:
    """A published JSON Schema, embedded whole (with its $id), so the document needs nothing from the network."""
    doc: dict[str, Any] = json.loads((resources.files("gateway") / "schemas" / name).read_text())
    return doc


def _problem_body(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": ref("Problem")}}}


def _secured(route: Route, open_alternative: bool) -> dict[str, Any]:
    operation = dict(route.operation)
    if route.scopes is None:
        return {**operation, "security": []}
    scopes = [s for s in route.scopes if "{" not in s]  # a scope bound to a path parameter is in the description
    operation["security"] = [{"apiKey": scopes}] + ([{}] if open_alternative else [])
    operation["responses"] = {**operation["responses"], "401": {"$ref": "#/components/responses/Unauthorized"},
                              "403": {"$ref": "#/components/responses/Forbidden"}}
    return operation


def schemas() -> dict[str, Any]:
    busy = {"type": "object", "required": ["start", "end", "status"], "properties": {
        "start": TIME, "end": TIME, "status": {"type": "string"}}}
    return {
        "Room": {"type": "object", "required": ["email", "state", "reason", "remedy"], "properties": {
            "email": {"type": "string"}, "state": {"type": "string"}, "reason": {"type": "string"},
            "remedy": {"type": "string"},
            "last_sync_age_seconds": {"type": ["number", "null"], "description": "the local API: since the last "
                                      "successful sync"},
            "updated_at": {"type": "string", "description": "the hub: when its state last changed"},
            "gateway_connected": {"type": "boolean", "description": "the hub: the room's gateway is connected"}}},
        "RoomList": {"type": "object", "required": ["rooms"], "properties": {
            "rooms": {"type": "array", "items": ref("Room")},
            "elsewhere": {"type": "array", "description": "the local API of one of several replicas: the rooms "
                          "another replica syncs, and where (its reads and commands answer 421 misdirected here, or "
                          "commands are forwarded when replicas.peer_url is set)", "items": {
                              "type": "object", "required": ["email", "owner"], "properties": {
                                  "email": {"type": "string"}, "owner": {
                                      "type": "object", "required": ["ordinal", "url"], "properties": {
                                          "ordinal": {"type": "integer"}, "url": {"type": ["string", "null"]}}}}}}}},
        "Booking": packaged_schema("booking.v1.json"),
        "BookingList": {"type": "object", "required": ["room", "start", "end", "bookings"], "properties": {
            "room": {"type": "string"}, "start": TIME, "end": TIME,
            "bookings": {"type": "array", "items": ref("Booking")}}},
        "Availability": {"type": "object", "required": ["start", "end", "rooms"], "properties": {
            "start": TIME, "end": TIME,
            "rooms": {"type": "object", "additionalProperties": {"type": "array", "items": busy}}}},
        "Command": packaged_schema("relay/command.v1.json"),
        "CommandResult": packaged_schema("relay/result.v1.json"),
        "Problem": {
            "type": "object", "required": ["type", "title", "status", "detail", "error", "message"],
            "description": "RFC 9457 problem details, with the stable code (error) and message of earlier versions",
            "properties": {
                "type": {"type": "string", "format": "uri"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"},
                "error": {"type": "string", "description": "a stable code"},
                "message": {"type": "string", "description": "what went wrong and what to do (= detail)"},
                "retryable": {"type": "boolean"},
                "last_event_id": {"type": "integer", "description": "with last_event_id_ahead: the id of the "
                                  "stream's last event, where to resume"}}},
        "Health": {"type": "object", "required": ["status", "version"], "properties": {
            "status": {"const": "ok"}, "version": {"type": "string"},
            "gateways_connected": {"type": "integer", "description": "the hub: gateways with a live tunnel"}}},
    }


def build(*, title: str, description: str, routes: Iterable[Route], version: str, security: str,
          bearer_format: str, open_alternatives: Iterable[str] = (),
          extra_schemas: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``security``: how to get a key and what its scopes are. ``open_alternatives``: names of routes a caller
    may also use without a key (the local /metrics on a loopback-only API)."""
    optional = set(open_alternatives)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _secured(route, route.name in optional)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": bearer_format,
                                           "description": security}},
            "schemas": {**schemas(), **(extra_schemas or {})},
            "responses": {
                "Problem": _problem_body("what went wrong and what to do"),
                "Unauthorized": {**_problem_body("no API key, or not a valid one (missing_api_key, invalid_api_key, "
                                                 "revoked_api_key)"),
                                 "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
                "Forbidden": {**_problem_body("the key lacks a scope the endpoint needs (insufficient_scope)"),
                              "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
            },
        },
    }


