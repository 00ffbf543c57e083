"""The HTTP layer the local API and the hub share (gateway/web/): one booking API under two prefixes, documented
by one builder; problem details; the command status table."""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator

from gateway import api
from gateway.hub import server as hub
from gateway.model import Command, CommandType, accepted, declined, failed
from gateway.web.commands import status_of
from gateway.web.problem import document
from gateway.web.routes import BOOKING_ROUTES


def _without_customer(operation: dict) -> dict:
    op = dict(operation)
    op["parameters"] = [p for p in op.get("parameters", []) if p["name"] != "customer"]
    op.pop("description", None)
    return op


def test_the_local_api_and_the_hub_serve_the_same_booking_routes_documented_alike():
    local, vendor = json.loads(json.dumps(api.OPENAPI)), json.loads(json.dumps(hub.OPENAPI))
    for route in BOOKING_ROUTES:
        method = route.method.lower()
        at_gateway = local["paths"]["/v1" + route.path][method]
        at_hub = vendor["paths"]["/v1/customers/{customer}" + route.path][method]
        assert _without_customer(at_gateway) == _without_customer(at_hub), route.name
        assert any(p["name"] == "customer" and p["in"] == "path" for p in at_hub["parameters"])
    assert local["components"]["schemas"].keys() - {"Ready"} == vendor["components"]["schemas"].keys()


def test_the_hub_documents_every_route_it_serves():
    doc = json.loads(json.dumps(hub.OPENAPI))
    served = {(r.path, r.method.lower()) for r in hub.ROUTES}
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == served
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert name
    assert doc["paths"]["/admin/v1/gateways"]["get"]["security"] == [{"apiKey": ["admin"]}]
    assert doc["paths"]["/v1/customers/{customer}/commands"]["post"]["security"] == [{"apiKey": ["book"]}]
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []


def test_a_problem_document_keeps_the_fields_clients_read():
    doc = document(404, "room_unknown", "no room x@y is connected", retryable=False)
    assert doc == {"type": "https://exchange-gateway.dev/problems/room_unknown", "title": "Room unknown",
                   "status": 404, "detail": "no room x@y is connected", "error": "room_unknown",
                   "message": "no room x@y is connected", "retryable": False}
    assert Draft202012Validator(api.OPENAPI["components"]["schemas"]["Problem"]).is_valid(doc)


def test_one_status_table_for_command_results():
    cmd = Command("k", CommandType.CREATE)
    assert status_of(accepted(cmd)) == status_of(declined(cmd, "conflict", "busy")) == 200
    assert [status_of(failed("k", reason, "", retryable=False)) for reason in (
        "invalid_command", "unsupported_command", "idempotency_conflict", "too_large", "gateway_offline",
        "exchange_unavailable", "internal")] == [400, 400, 409, 413, 503, 200, 200]
