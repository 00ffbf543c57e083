"""The local API with API keys, over a real aiohttp server on 127.0.0.1 and a real SQLite file: who gets in (401,
403, open endpoints), POST /v1/commands and GET /v1/availability through a CommandHandler, bad commands answered
with clear 400s while the server keeps serving, and the OpenAPI document checked against itself and against real
responses.

The CommandHandler here is a fake of our own seam (it records commands and answers what a test says); the real
one is tested end to end with the simulator elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from structlog.testing import capture_logs

from gateway import api as api_module
from gateway.api import OPENAPI, ROUTES, Api, EventHub, is_loopback
from gateway.model import (
    EVENT_TYPES,
    Booking,
    Command,
    CommandResult,
    Event,
    Person,
    Room,
    RoomState,
    accepted,
    declined,
    failed,
    to_json,
)
from gateway.observability.metrics import Metrics
from gateway.relay.protocol import MAX_COMMAND_BYTES
from gateway.store.apikeys import ApiKeys, key_id_of
from gateway.store.sqlite import SqliteStore
from tests.conftest import eventually
from tests.openapi_validation import REGISTRY, conforms, pointer, schema_ref

ROOM = "room1@contoso.com"
Answer = Callable[[Command], CommandResult]


def soon(hours: float = 26) -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeCommands:
    """Records every command; answers with ``answer`` (default: accepted), optionally after ``gate`` opens."""

    def __init__(self) -> None:
        self.received: list[Command] = []
        self.finished: list[CommandResult] = []
        self.answer: Answer = lambda cmd: accepted(cmd, "booked", booking_id="bk-1", uid="uid-1")
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def execute(self, cmd: Command) -> CommandResult:
        self.received.append(cmd)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        result = self.answer(cmd)
        self.finished.append(result)
        return result


class Served:
    """A running API, its store and keys, and a bearer header per scope set."""

    def __init__(self, client: Any, api: Api, keys: ApiKeys, commands: FakeCommands | None) -> None:
        self.client = client
        self.api = api
        self.keys = keys
        self.commands = commands
        self.tokens = {name: keys.create(name, scopes) for name, scopes in (
            ("read", ["read"]), ("book", ["book"]), ("metrics", ["metrics"]), ("all", ["read", "book", "metrics"]))}

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def refusals(self, reason: str) -> float:
        return float(self.api.metrics.api_auth_failures.labels(reason)._value.get())

    async def post(self, body: Any, key: str = "book", raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        resp = await self.client.post("/v1/commands", data=data, headers={**self.auth(key),
                                                                          "Content-Type": "application/json"})
        return resp.status, await resp.json()


@pytest.fixture
def store(tmp_path: Any) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "g.sqlite")
    s.upsert_room(Room(ROOM, state="verified"))
    meeting = Booking(room=ROOM, uid="040000008200E00074C5B7101A82E008", start=soon(), end=soon(27),
                      timezone="Europe/Berlin", subject="Planning", organizer=Person("alice@contoso.com", "Alice"))
    event = Event(id="e1", type=EVENT_TYPES["created"], room=ROOM, subject=meeting.id, time=datetime.now(UTC),
                  data=to_json(meeting))
    s.commit_sync(ROOM, upserts=[meeting], deletes=[], events=[event])
    yield s
    s.close()


@pytest.fixture
def serve(store: SqliteStore, aiohttp_client: Any) -> Iterator[Callable[..., Any]]:
    apis: list[Api] = []

    async def start(*, commands: FakeCommands | None = None, enabled: bool = True, loopback_only: bool = False,
                    keys: ApiKeys | None = None, server_kwargs: dict[str, Any] | None = None,
                    room_states: Callable[[], dict[str, dict[str, Any]]] = dict) -> Served:
        keys = keys or ApiKeys(store)
        commands = commands or (FakeCommands() if enabled else None)
        api = Api(store, Metrics(), EventHub(), room_states=room_states, ready=lambda: True, keys=keys,
                  commands=commands, loopback_only=loopback_only)
        apis.append(api)
        client = await aiohttp_client(api.app(), server_kwargs=server_kwargs or {})
        return Served(client, api, keys, commands)

    yield start
    for a in apis:
        a.close()


def create(key: str = "cmd-1", **fields: Any) -> dict[str, Any]:
    return {"key": key, "type": "create", "room": ROOM, "start": iso(soon()), "end": iso(soon(27)),
            "subject": "Stand-up", "booker": {"name": "Lobby display"}, **fields}


# -- who gets in ---------------------------------------------------------------------------------------------------
async def test_without_a_key_v1_answers_401_naming_the_fix_and_open_endpoints_stay_open(serve):
    s = await serve()
    for path in ("/v1/rooms", f"/v1/rooms/{ROOM}/bookings", "/v1/events", "/v1/availability", "/v1/nothing"):
        resp = await s.client.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.json()
        assert body["error"] == "missing_api_key" and "gateway api-keys create" in body["message"]
    assert (await s.client.post("/v1/commands", json=create())).status == 401
    assert s.refusals("missing") == 6
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await s.client.get(path)).status == 200, path
    assert s.commands is not None and s.commands.received == []


async def test_a_rooms_live_state_is_listed_with_its_own_reason_not_the_stored_rows(serve, store):
    # The worker takes its new state as the step storing it is queued: while the store still holds the state
    # before, the list must not pair the new state with the old one's reason.
    store.upsert_room(Room(ROOM, state=RoomState.POLLING, reason="change feed down (FeedBroken: x)"))
    live: dict[str, dict[str, Any]] = {ROOM: {"state": "verified", "reason": "", "remedy": ""}}
    s = await serve(room_states=lambda: live)
    [listed] = (await (await s.client.get("/v1/rooms", headers=s.auth("all"))).json())["rooms"]
    assert (listed["state"], listed["reason"]) == ("verified", "")
    live.clear()  # no worker for the room: its stored row
    [listed] = (await (await s.client.get("/v1/rooms", headers=s.auth("all"))).json())["rooms"]
    assert (listed["state"], listed["reason"]) == ("polling", "change feed down (FeedBroken: x)")


async def test_wrong_malformed_and_revoked_keys_get_401(serve):
    s = await serve()
    real = s.tokens["all"]
    wrong = f"gwk_{key_id_of(real)}_{'A' * 43}"
    for header, code in ((f"Bearer {wrong}", "invalid_api_key"), ("Bearer gwk_nonsense", "invalid_api_key"),
                         ("Bearer", "invalid_api_key"), (f"Basic {real}", "invalid_api_key"),
                         (f"Bearer {real}x", "invalid_api_key")):
        resp = await s.client.get("/v1/rooms", headers={"Authorization": header})
        assert resp.status == 401, header
        assert (await resp.json())["error"] == code
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert (await s.client.get("/v1/rooms", headers=s.auth("all"))).status == 200

    s.keys.revoke(key_id_of(real) or "")
    resp = await s.client.get("/v1/rooms", headers=s.auth("all"))
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "revoked_api_key" and "gateway api-keys create" in body["message"]
    assert s.refusals("unknown") == 1 and s.refusals("malformed") == 4 and s.refusals("revoked") == 1


async def test_a_revocation_by_another_process_reaches_the_api_within_the_cache_bound(serve, store, tmp_path):
    s = await serve(keys=ApiKeys(store, cache_seconds=0.3))
    assert (await s.client.get("/v1/rooms", headers=s.auth("read"))).status == 200
    admin = SqliteStore(tmp_path / "g.sqlite")  # `gateway api-keys revoke` next to the running gateway
    try:
        assert ApiKeys(admin).revoke(key_id_of(s.tokens["read"]) or "")
    finally:
        admin.close()

    async def refused() -> bool:
        return (await s.client.get("/v1/rooms", headers=s.auth("read"))).status == 401
    await eventually(refused, timeout=10, what="the revoked key to be refused")


async def test_scopes_decide_what_a_key_may_do(serve):
    s = await serve()
    resp = await s.client.post("/v1/commands", json=create(), headers=s.auth("read"))
    assert resp.status == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert 'scope="book"' in resp.headers["WWW-Authenticate"]
    body = await resp.json()
    assert body["error"] == "insufficient_scope" and "--scope book" in body["message"]
    assert s.commands is not None and s.commands.received == []

    assert (await s.client.get("/v1/rooms", headers=s.auth("book"))).status == 403
    assert (await s.client.get("/v1/rooms", headers=s.auth("read"))).status == 200
    assert (await s.client.get("/metrics")).status == 401  # not loopback-only: metrics need a key
    assert (await s.client.get("/metrics", headers=s.auth("read"))).status == 403
    resp = await s.client.get("/metrics", headers=s.auth("metrics"))
    assert resp.status == 200 and "gateway_api_auth_failures_total" in await resp.text()
    assert (await s.client.get("/v1/nothing", headers=s.auth("metrics"))).status == 404  # any valid key
    assert s.refusals("scope") == 3


async def test_metrics_are_open_when_the_api_listens_on_loopback_only(serve):
    s = await serve(loopback_only=True)
    assert (await s.client.get("/metrics")).status == 200
    assert (await s.client.get("/v1/rooms")).status == 401
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("gateway.corp")


async def test_last_use_is_recorded_without_a_write_per_request(serve):
    s = await serve()
    for _ in range(5):
        assert (await s.client.get("/v1/rooms", headers=s.auth("read"))).status == 200

    def last_used() -> datetime | None:
        return {k.name: k.last_used_at for k in s.keys.list()}["read"]
    first = await eventually(last_used, what="last_used_at to be written")
    for _ in range(5):
        await s.client.get("/v1/rooms", headers=s.auth("read"))
    assert last_used() == first  # within the minute: no further writes
    assert {k.name: k.last_used_at for k in s.keys.list()}["book"] is None


async def test_keys_never_reach_the_logs(serve):
    s = await serve()
    wrong = f"gwk_{key_id_of(s.tokens['read'])}_{'B' * 43}"
    with capture_logs() as logs:
        await s.client.get("/v1/rooms", headers={"Authorization": f"Bearer {wrong}"})
        await s.client.get("/v1/rooms", headers=s.auth("read"))
        await s.client.post("/v1/commands", json=create(), headers=s.auth("read"))
        await s.client.post("/v1/commands", json=create(), headers=s.auth("book"))
        s.keys.revoke(key_id_of(s.tokens["all"]) or "")
        await s.client.get("/v1/rooms", headers=s.auth("all"))
    text = repr(logs)
    for token in [*s.tokens.values(), wrong]:
        assert token.split("_", 2)[2] not in text
    refused = [e for e in logs if e["event"] == "api.auth_refused"]
    assert {e["reason"] for e in refused} == {"unknown", "scope", "revoked"}
    assert all(e["key_id"] for e in refused)  # the id (not secret) says which client to fix


# -- commands --------------------------------------------------------------------------------------------------
async def test_a_valid_command_goes_to_the_handler_and_every_outcome_is_a_200_result(serve):
    s = await serve()
    commands = s.commands
    assert commands is not None
    status, body = await s.post(create(organizer=None, booker={"email": "guest@example.com", "name": "Guest"}))
    assert status == 200 and body == {"key": "cmd-1", "status": "accepted", "message": "booked",
                                      "booking_id": "bk-1", "uid": "uid-1"}
    cmd = commands.received[-1]
    assert (cmd.type, cmd.room, cmd.start, cmd.end) == ("create", ROOM, soon(), soon(27))
    assert cmd.booker == Person("guest@example.com", "Guest")

    outcomes: list[Answer] = [
        lambda c: declined(c, "conflict", "the room is busy then"),
        lambda c: failed(c.key, "exchange_unavailable", "Exchange is throttling", retryable=True),
        lambda c: failed(c.key, "not_created_by_gateway", "decline instead", retryable=False),
    ]
    for i, answer in enumerate(outcomes):
        commands.answer = answer
        status, body = await s.post(create(key=f"cmd-{i + 2}"))
        assert status == 200 and body == answer(commands.received[-1]).to_json()
    assert body["retryable"] is False and body["reason"] == "not_created_by_gateway"


async def test_a_result_gets_the_status_the_hub_gives_the_same_result(serve):
    s = await serve()
    commands = s.commands
    assert commands is not None
    for reason, status in (("idempotency_conflict", 409), ("too_large", 413), ("invalid_command", 400),
                           ("internal", 200), ("gateway_offline", 503)):
        commands.answer = lambda c, reason=reason: failed(c.key, reason, "no", retryable=False)  # type: ignore[misc]
        got, body = await s.post(create(key=f"k-{reason}"))
        assert (got, body) == (status, commands.finished[-1].to_json()), reason


@pytest.mark.parametrize(("body", "raw", "reason", "key", "words"), [
    (None, b"{not json", "invalid_command", "", "not valid JSON"),
    (None, b"\xff\xfe", "invalid_command", "", "not UTF-8"),
    (None, b"x" * (MAX_COMMAND_BYTES + 1), "too_large", "", f"larger than {MAX_COMMAND_BYTES}"),
    ([1, 2], None, "invalid_command", "", "JSON object"),
    ({"type": "create", "room": ROOM}, None, "invalid_command", "", "'key'"),
    ({"key": "k1", "type": "teleport"}, None, "unsupported_command", "k1", "unknown command type"),
    ({"key": "k2", "type": "cancel", "room": ROOM, "booking_id": "b", "colour": "red"}, None, "invalid_command",
     "k2", "colour"),
    ("past", None, "invalid_command", "k3", "in the past"),
    ("reversed", None, "invalid_command", "k4", "reversed"),
    ({"key": "k5", "type": "create", "room": "not-an-address", "start": "2030-01-01T10:00:00Z",
      "end": "2030-01-01T11:00:00Z"}, None, "invalid_command", "k5", "'room'"),
    ({"key": "k6", "type": "create", "room": ROOM, "start": "tomorrow", "end": "2030-01-01T11:00:00Z"}, None,
     "invalid_command", "k6", "'start'"),
    # Valid RFC 3339 that no datetime holds once in UTC: past year 9999, before year 1.
    ({"key": "k7", "type": "create", "room": ROOM, "start": "9999-12-31T23:00:00-01:00",
      "end": "9999-12-31T23:30:00-01:00"}, None, "invalid_command", "k7", "'start'"),
    ({"key": "k8", "type": "availability", "rooms": [ROOM], "start": "0001-01-01T00:30:00+01:00",
      "end": "2030-01-01T11:00:00Z"}, None, "invalid_command", "k8", "'start'"),
])
async def test_bad_commands_get_a_clear_400_and_the_server_keeps_serving(serve, body, raw, reason, key, words):
    s = await serve()
    if body == "past":
        body = create(key="k3", start=iso(soon(-50)), end=iso(soon(-49)))
    elif body == "reversed":
        body = create(key="k4", start=iso(soon(27)), end=iso(soon()))
    status, result = await s.post(body, raw=raw)
    assert status == (413 if reason == "too_large" else 400)  # the hub's statuses (gateway/web/commands.py)
    assert result["status"] == "failed" and result["reason"] == reason and result["retryable"] is False
    assert result["key"] == key
    assert words in result["message"], result["message"]
    assert s.commands is not None and s.commands.received == []
    status, result = await s.post(create())
    assert status == 200 and result["status"] == "accepted"


async def test_commands_disabled_answer_503(serve):
    s = await serve(enabled=False)
    resp = await s.client.post("/v1/commands", json=create(), headers=s.auth("book"))
    assert resp.status == 503 and (await resp.json())["error"] == "commands_disabled"
    resp = await s.client.get("/v1/availability", params={"rooms": ROOM, "start": iso(soon()), "end": iso(soon(27))},
                              headers=s.auth("read"))
    assert resp.status == 503 and "commands.enabled" in (await resp.json())["message"]


async def test_a_crashing_handler_becomes_a_retryable_internal_failure(serve):
    s = await serve()
    assert s.commands is not None

    def boom(cmd: Command) -> CommandResult:
        raise RuntimeError("bug")
    s.commands.answer = boom
    with capture_logs() as logs:
        status, body = await s.post(create())
    assert status == 200 and body["status"] == "failed" and body["reason"] == "internal" and body["retryable"]
    assert any(e["event"] == "api.command_crashed" for e in logs)


async def test_a_client_hanging_up_does_not_cancel_a_command_half_way(serve):
    s = await serve(server_kwargs={"handler_cancellation": True})  # as `gateway run` serves
    commands = s.commands
    assert commands is not None
    commands.gate = asyncio.Event()
    request = asyncio.ensure_future(s.post(create()))
    await asyncio.wait_for(commands.entered.wait(), 10)
    request.cancel()
    await s.client.close()  # the connection goes away while the command is inside Exchange
    await asyncio.sleep(0)
    commands.gate.set()
    await eventually(lambda: len(commands.finished) == 1, what="the command to finish anyway")


# -- availability ----------------------------------------------------------------------------------------------
async def test_availability_runs_an_availability_command_and_returns_its_data(serve):
    s = await serve()
    commands = s.commands
    assert commands is not None
    busy = {ROOM: [{"start": iso(soon()), "end": iso(soon(27)), "status": "busy"}], "room2@contoso.com": []}
    commands.answer = lambda c: accepted(c, data={"rooms": busy})
    params = {"rooms": f"{ROOM}, room2@contoso.com", "start": iso(soon(-2)), "end": iso(soon(48))}
    resp = await s.client.get("/v1/availability", params=params, headers=s.auth("read"))
    assert resp.status == 200
    assert await resp.json() == {"start": iso(soon(-2)), "end": iso(soon(48)), "rooms": busy}
    cmd = commands.received[-1]
    assert cmd.type == "availability" and cmd.rooms == (ROOM, "room2@contoso.com")
    assert cmd.key.startswith("api-availability-")
    resp = await s.client.get("/v1/availability", params=params, headers=s.auth("read"))
    assert commands.received[-1].key != cmd.key  # a fresh key per request

    commands.answer = lambda c: declined(c, "room_unknown", "no such room")
    resp = await s.client.get("/v1/availability", params=params, headers=s.auth("read"))
    assert resp.status == 404 and (await resp.json())["error"] == "room_unknown"
    commands.answer = lambda c: failed(c.key, "exchange_unavailable", "try later", retryable=True)
    resp = await s.client.get("/v1/availability", params=params, headers=s.auth("read"))
    assert resp.status == 503 and (await resp.json())["retryable"] is True

    calls = len(commands.received)
    for bad, code, words in (  # the query the hub's availability takes, refused the same way
            ({"rooms": ROOM, "start": iso(soon(27)), "end": iso(soon())}, "invalid_range", "after start"),
            ({"start": iso(soon()), "end": iso(soon(27))}, "invalid_rooms", "?rooms="),
            ({"rooms": ROOM, "start": iso(soon()), "end": iso(soon(24 * 60))}, "invalid_range", "42 days"),
            ({"rooms": ROOM, "start": "tomorrow"}, "invalid_time", "ISO 8601"),
            ({"rooms": "not-an-address"}, "invalid_command", "'rooms[]'")):
        resp = await s.client.get("/v1/availability", params=bad, headers=s.auth("read"))
        doc = await resp.json()
        assert (resp.status, doc["error"]) == (400, code), doc
        assert words in doc["message"] and doc["detail"] == doc["message"]
    assert len(commands.received) == calls
    assert (await s.client.get("/v1/availability", params=params, headers=s.auth("book"))).status == 403
    commands.answer = lambda c: accepted(c, data={"rooms": {ROOM: []}})
    resp = await s.client.get("/v1/availability", params={"rooms": ROOM}, headers=s.auth("read"))
    assert resp.status == 200 and commands.received[-1].end - commands.received[-1].start == timedelta(days=1)


# -- revoked keys and open streams -----------------------------------------------------------------------------
async def test_an_event_stream_ends_once_its_key_is_revoked(serve, monkeypatch):
    monkeypatch.setattr(api_module, "SSE_KEEPALIVE_SECONDS", 0.2)
    s = await serve()
    async with s.client.get("/v1/events", headers=s.auth("read")) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"retry:")
        s.keys.revoke(key_id_of(s.tokens["read"]) or "")
        rest = await asyncio.wait_for(resp.content.read(), 10)  # returns when the server ends the stream
    assert b"event: " + EVENT_TYPES["created"].encode() in rest


# -- the OpenAPI document --------------------------------------------------------------------------------------
def refs_in(node: Any, base: Any) -> Iterator[tuple[str, Any]]:
    """Every $ref with the document it is relative to (the nearest enclosing schema with an $id)."""
    if isinstance(node, dict):
        if isinstance(node.get("$id"), str):
            base = node
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v, base
            else:
                yield from refs_in(v, base)
    elif isinstance(node, list):
        for v in node:
            yield from refs_in(v, base)


def ids_in(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("$id"), str):
            found.add(node["$id"])
        for v in node.values():
            found |= ids_in(v)
    elif isinstance(node, list):
        for v in node:
            found |= ids_in(v)
    return found


def test_the_openapi_document_is_well_formed_and_lists_every_route():
    doc = json.loads(json.dumps(OPENAPI))  # plain JSON, as served
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] and doc["info"]["version"]
    served = {(r.path, r.method.lower()): r for r in ROUTES}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert documented == set(served)  # every route documented, nothing documented that is not served
    operation_ids = []
    for (path, method), route in served.items():
        op = doc["paths"][path][method]
        operation_ids.append(op["operationId"])
        assert op["summary"] and any(code.startswith("2") for code in op["responses"])
        for name in [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]:
            assert any(p["in"] == "path" and p["name"] == name and p["required"] for p in op["parameters"])
        if route.scope is None:
            assert op["security"] == []
        else:
            assert {"apiKey": [route.scope]} in op["security"]
            assert {"401", "403"} <= set(op["responses"])
    assert len(set(operation_ids)) == len(operation_ids)

    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert all(f"`{scope}`" in scheme["description"] for scope in ("read", "book", "metrics"))
    assert "gateway api-keys create" in scheme["description"]

    embedded = ids_in(doc)
    for ref, base in refs_in(doc, doc):
        if ref.startswith("#/"):
            pointer(base, ref)  # raises when it points nowhere
        elif not ref.startswith("#"):
            assert ref.split("#")[0] in embedded, f"{ref} is neither local nor embedded"
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert name
    for name in ("Command", "CommandResult", "Booking"):
        assert doc["components"]["schemas"][name].get("$id", "").startswith("https://exchange-gateway.dev/schemas/")


async def test_real_responses_have_the_documented_shapes(serve):
    s = await serve()
    commands = s.commands
    assert commands is not None
    resp = await s.client.get("/v1/rooms", headers=s.auth("read"))
    rooms = await resp.json()
    assert rooms["rooms"][0]["email"] == ROOM
    conforms(rooms, "/v1/rooms", "get", 200)

    resp = await s.client.get(f"/v1/rooms/{ROOM}/bookings", params={"end": iso(soon(48))}, headers=s.auth("read"))
    bookings = await resp.json()
    assert [b["subject"] for b in bookings["bookings"]] == ["Planning"]
    conforms(bookings, "/v1/rooms/{room}/bookings", "get", 200)
    with pytest.raises(AssertionError):  # the check has teeth: a booking without its id is not a Booking
        del bookings["bookings"][0]["id"]
        conforms(bookings, "/v1/rooms/{room}/bookings", "get", 200)
    resp = await s.client.get("/v1/rooms/nobody@contoso.com/bookings", headers=s.auth("read"))
    conforms(await resp.json(), "/v1/rooms/{room}/bookings", "get", resp.status)
    resp = await s.client.get(f"/v1/rooms/{ROOM}/bookings", params={"start": "soon"}, headers=s.auth("read"))
    conforms(await resp.json(), "/v1/rooms/{room}/bookings", "get", resp.status)

    command = Draft202012Validator(schema_ref("#/components/schemas/Command"), registry=REGISTRY)
    assert command.is_valid(create()) and not command.is_valid(create(colour="red"))  # the documented request
    for answer in (lambda c: accepted(c, "booked", booking_id="bk-1", uid="uid-1"),
                   lambda c: declined(c, "conflict", "busy"),
                   lambda c: failed(c.key, "rate_limited", "slow down", retryable=True)):
        commands.answer = answer
        status, body = await s.post(create())
        conforms(body, "/v1/commands", "post", status)
    for raw in (b"[", json.dumps(create(key="k", end=iso(soon(-30)))).encode()):
        status, body = await s.post(None, raw=raw)
        assert status == 400
        conforms(body, "/v1/commands", "post", 400)

    commands.answer = lambda c: accepted(c, data={"rooms": {ROOM: [{"start": iso(soon()), "end": iso(soon(27)),
                                                                    "status": "busy"}]}})
    resp = await s.client.get("/v1/availability", headers=s.auth("read"),
                              params={"rooms": ROOM, "start": iso(soon()), "end": iso(soon(30))})
    conforms(await resp.json(), "/v1/availability", "get", 200)

    resp = await s.client.get("/v1/rooms")
    conforms(await resp.json(), "/v1/rooms", "get", 401)
    resp = await s.client.post("/v1/commands", json=create(), headers=s.auth("read"))
    conforms(await resp.json(), "/v1/commands", "post", 403)
    for path in ("/healthz", "/readyz"):
        resp = await s.client.get(path)
        conforms(await resp.json(), path, "get", resp.status)
    assert await (await s.client.get("/openapi.json")).json() == json.loads(json.dumps(OPENAPI))
