"""The published JSON Schemas (gateway/schemas/relay) describe what the code actually sends and accepts.

- every message the hub sends (captured from a real hub over TLS) and every message the gateway's encoders build
  validates against message.v1.json;
- protocol.parse_command accepts what command.v1.json accepts and refuses what it refuses, on a corpus;
- the schemas' enums are the code's constants (error codes, decline reasons, message and command types).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

import gateway
from gateway.errors import ProtocolError
from gateway.model import (
    COMMAND_TYPES,
    DECLINE_REASONS,
    EVENT_TYPES,
    Attendee,
    Booking,
    CommandResult,
    Event,
    Person,
    accepted,
    declined,
    failed,
    to_json,
)
from gateway.ports import OutboxEntry
from gateway.relay import protocol
from gateway.relay.window import encode_event
from tests.fake_gateway import FakeGateway, cloud_event, create_command, items
from tests.hub_fixtures import Vendor

SCHEMAS = Path(gateway.__file__).parent / "schemas"
RELAY = SCHEMAS / "relay"


def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.rglob("*.json"):
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def schema(name: str) -> dict[str, Any]:
    return json.loads((RELAY / name).read_text())


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(schema(name), registry=REGISTRY)


MESSAGE = validator("message.v1.json")
COMMAND = validator("command.v1.json")


def check_message(text: str) -> dict[str, Any]:
    doc = json.loads(text)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in MESSAGE.iter_errors(doc)]
    assert not errors, f"{doc.get('type')} message does not follow the schema: {errors}"
    return doc


# -- the schemas themselves --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in RELAY.glob("*.json")))
def test_schema_is_valid_and_its_examples_validate(name):
    doc = schema(name)
    Draft202012Validator.check_schema(doc)
    assert doc["$id"].endswith(f"/relay/{name}")
    for example in doc.get("examples", []):
        errors = list(Draft202012Validator(doc, registry=REGISTRY).iter_errors(example))
        assert not errors, [e.message for e in errors]


def test_schema_enums_are_the_codes_constants():
    assert schema("message.v1.json")["properties"]["type"]["enum"] == list(protocol.MESSAGE_TYPES)
    assert {f"msg-{t}.v1.json" for t in protocol.MESSAGE_TYPES} <= {p.name for p in RELAY.glob("msg-*.json")}
    assert schema("msg-error.v1.json")["properties"]["code"]["enum"] == list(protocol.ERROR_CODES)
    assert schema("command.v1.json")["properties"]["type"]["enum"] == list(COMMAND_TYPES)
    result = {b["if"]["properties"]["status"]["const"]: b["then"] for b in schema("result.v1.json")["allOf"]}
    assert result["declined"]["properties"]["reason"]["enum"] == list(DECLINE_REASONS)
    assert result["failed"]["properties"]["reason"]["enum"] == list(protocol.ERROR_CODES)
    assert schema("msg-hello.v1.json")["properties"]["protocol"]["const"] == protocol.PROTOCOL_VERSION
    assert schema("msg-events.v1.json")["properties"]["events"]["maxItems"] == protocol.MAX_BATCH


# -- what the hub sends ------------------------------------------------------------------------------------------
async def test_every_message_the_hub_sends_follows_the_schema(http, hub):
    vendor = Vendor(http, hub.url)
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    frames = [json.dumps(link.challenge), json.dumps(link.welcome)]
    await link.events(items([cloud_event("room_state", ""), cloud_event("created", "u1", room_seq=2)]))
    call = asyncio.create_task(vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                           body=create_command()))
    await link.recv()
    await link.send("result", result={"key": "cmd-1", "status": "accepted"})
    await call
    new = Ed25519PrivateKey.generate()
    new_id = FakeGateway.key_id_of(new)
    assert gw.gateway_id is not None
    await link.send("rotate_key", public_key=FakeGateway.public_b64(new), key_id=new_id, signature=protocol.b64(
        new.sign(protocol.signed_rotation(link.challenge["nonce"], gw.gateway_id, new_id))))
    await link.recv()
    async with http.post(link.welcome["notifications"]["url"], json={"value": [{"changeType": "updated"}]}) as resp:
        assert resp.status == 202
    await link.recv()
    await link.ws.send_str("not json")
    await link.recv()
    await link.send("ack", seq=1)
    await link.recv()
    await vendor.call("POST", f"/admin/v1/gateways/{gw.gateway_id}/revoke")
    await link.closed()
    refused = await gw.connect(http, hub.url)
    await refused.closed()
    frames += link.received + refused.received
    frames.append(json.dumps(refused.challenge))
    seen = {check_message(f)["type"] for f in frames}
    assert seen == {"challenge", "welcome", "ack", "command", "key_rotated", "error", "notification"}


# -- what the gateway sends --------------------------------------------------------------------------------------
def _entry(seq: int, event: Event) -> OutboxEntry:
    return OutboxEntry(seq=seq, room_seq=event.sequence, event=event, created_at=datetime.now(UTC))


def test_every_message_a_gateway_builds_follows_the_schema():
    room = "room1@contoso.com"
    start = datetime(2026, 11, 23, 9, tzinfo=UTC)
    full = Booking(room=room, uid="040000008200E00074C5B7101A82E008", start=start, end=start + timedelta(hours=1),
                   timezone="Europe/Berlin", subject="Planning", organizer=Person("alice@contoso.com", "Alice"),
                   attendees=(Attendee("bob@contoso.com", "Bob", "required", "accepted"),
                              Attendee(room, None, "resource", "accepted")), original_start=start,
                   series_id="040000008200E00074C5B7101A82E008", confirmed_at=start)
    deleted = to_json(full) | {"reason": "removed_from_exchange"}
    events = [Event(str(uuid.uuid4()), EVENT_TYPES["created"], room, full.id, start, to_json(full), 1),
              Event(str(uuid.uuid4()), EVENT_TYPES["updated"], room, full.id, start, to_json(full), 2),
              Event(str(uuid.uuid4()), EVENT_TYPES["deleted"], room, full.id, start, deleted, 3),
              Event(str(uuid.uuid4()), EVENT_TYPES["room_state"], room, room, start,
                    {"room": room, "state": "impersonation_denied", "reason": "denied", "remedy": "grant it"}, 4)]
    tunnel_frame = '{"type":"events","events":[' + ",".join(encode_event(_entry(n + 1, e))
                                                              for n, e in enumerate(events)) + "]}"
    check_message(tunnel_frame)

    key = Ed25519PrivateKey.generate()
    key_id = FakeGateway.key_id_of(key)
    check_message(protocol.encode("hello", protocol=protocol.PROTOCOL_VERSION, gateway_id="gw_x", key_id=key_id,
                                  signature=protocol.b64(key.sign(b"x")), agent="exchange-gateway/0.1.0",
                                  last_seq=0))
    check_message(protocol.encode("rotate_key", public_key=FakeGateway.public_b64(key), key_id=key_id,
                                  signature=protocol.b64(key.sign(b"x"))))
    check_message(protocol.encode("error", code="unexpected", message="'challenge' is not valid from the hub here"))

    cmd = protocol.parse_command(create_command())
    results: list[CommandResult] = [
        accepted(cmd, booking_id="a" * 32, uid="u-1"), accepted(cmd, "queued"),
        accepted(cmd, data={"rooms": {room: [{"start": "2026-11-23T09:00:00Z", "end": "2026-11-23T10:00:00Z",
                                              "status": "tentative"}], "room2@contoso.com": []}}),
        *(declined(cmd, reason, "no") for reason in DECLINE_REASONS),
        *(failed(cmd.key, code, "no", retryable=bool(n % 2)) for n, code in enumerate(protocol.ERROR_CODES))]
    for result in results:
        check_message(protocol.result_message(result))
    check_message(protocol.encode("command", command=protocol.command_to_json(cmd)))


# -- commands: the schema and parse_command agree ----------------------------------------------------------------
SOON = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
S = SOON.strftime("%Y-%m-%dT%H:%M:%SZ")
E = (SOON + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
ROOM = "room1@contoso.com"
BOOKING = "0f3a" * 8


def create(**over: Any) -> dict[str, Any]:
    doc = {"key": "k-1", "type": "create", "room": ROOM, "start": S, "end": E}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not ...}


GOOD: dict[str, dict[str, Any]] = {
    "minimal create (a room display)": create(),
    "create for a directory user with attendees": create(subject="Planning", organizer={"email": "Alice@Contoso.com",
                                                                                         "name": "Alice"},
                                                         attendees=[{"email": "bob@contoso.com"}]),
    "create for a named external booker": create(booker={"name": "Guest", "email": "guest@example.org"}),
    "create for an anonymous booker": create(booker={}),
    "create with explicit nulls": create(subject=None, organizer=None, booker=None, attendees=None),
    "create with an empty attendee list": create(attendees=[]),
    "create with a UTC offset and fractions": create(start=SOON.strftime("%Y-%m-%dT%H:%M:%S.250+02:00"),
                                                     end=(SOON + timedelta(hours=3)).strftime(
                                                         "%Y-%m-%dT%H:%M:%S-01:30")),
    "create with the longest subject": create(subject="s" * 255),
    "key with every allowed character": create(key="Az09._:-" * 16),
    "update": {"key": "k", "type": "update", "room": ROOM, "booking_id": BOOKING, "start": S, "end": E},
    "cancel": {"key": "k", "type": "cancel", "room": ROOM, "booking_id": BOOKING},
    "decline with a message": {"key": "k", "type": "decline", "room": ROOM, "booking_id": "x", "message": "closed"},
    "decline without a message": {"key": "k", "type": "decline", "room": ROOM, "booking_id": BOOKING,
                                  "message": None},
    "resync": {"key": "k", "type": "resync", "room": "ROOM1@contoso.com"},
    "availability": {"key": "k", "type": "availability", "rooms": [ROOM, "room2@contoso.com"], "start": S,
                     "end": E},
}

BAD: dict[str, Any] = {
    "not an object": ["create"],
    "no key": {k: v for k, v in create().items() if k != "key"},
    "empty key": create(key=""),
    "key too long": create(key="k" * 129),
    "key with a space": create(key="my key"),
    "key not a string": create(key=42),
    "no type": {"key": "k", "room": ROOM},
    "unknown type": create(type="teleport"),
    "unknown field": create(colour="blue"),
    "field of another type": create(booking_id=BOOKING),
    "create without a room": create(room=...),
    "room not an address": create(room="Room 1"),
    "room with two @": create(room="a@b@c"),
    "create without start": create(start=...),
    "start null": create(start=None),
    "start not a string": create(start=1700000000),
    "start without an offset": create(start=S[:-1]),
    "start not a date": create(start="tomorrow at nine"),
    "subject too long": create(subject="s" * 256),
    "subject not a string": create(subject=["a"]),
    "organizer without email": create(organizer={"name": "Alice"}),
    "organizer not an object": create(organizer="alice@contoso.com"),
    "organizer with a bad email": create(organizer={"email": "alice"}),
    "booker with a bad email": create(booker={"email": "guest at example.org"}),
    "booker name too long": create(booker={"name": "n" * 256}),
    "organizer and booker": create(organizer={"email": "alice@contoso.com"}, booker={"name": "Guest"}),
    "attendees without organizer": create(attendees=[{"email": "bob@contoso.com"}]),
    "attendee without email": create(organizer={"email": "alice@contoso.com"}, attendees=[{"name": "Bob"}]),
    "too many attendees": create(organizer={"email": "alice@contoso.com"},
                                 attendees=[{"email": f"p{n}@contoso.com"} for n in range(101)]),
    "attendees not a list": create(organizer={"email": "alice@contoso.com"}, attendees={"email": "b@c.d"}),
    "update without booking_id": {"key": "k", "type": "update", "room": ROOM, "start": S, "end": E},
    "update without times": {"key": "k", "type": "update", "room": ROOM, "booking_id": BOOKING},
    "cancel with an empty booking_id": {"key": "k", "type": "cancel", "room": ROOM, "booking_id": ""},
    "booking_id too long": {"key": "k", "type": "cancel", "room": ROOM, "booking_id": "b" * 129},
    "cancel with times": {"key": "k", "type": "cancel", "room": ROOM, "booking_id": BOOKING, "start": S},
    "decline message too long": {"key": "k", "type": "decline", "room": ROOM, "booking_id": BOOKING,
                                 "message": "m" * 2001},
    "resync without a room": {"key": "k", "type": "resync"},
    "availability without rooms": {"key": "k", "type": "availability", "rooms": [], "start": S, "end": E},
    "availability with too many rooms": {"key": "k", "type": "availability", "start": S, "end": E,
                                         "rooms": [f"r{n}@contoso.com" for n in range(101)]},
    "availability with room": {"key": "k", "type": "availability", "room": ROOM, "start": S, "end": E},
    "availability rooms not a list": {"key": "k", "type": "availability", "rooms": ROOM, "start": S, "end": E},
    "availability without end": {"key": "k", "type": "availability", "rooms": [ROOM], "start": S},
}

# Valid by the schema, refused by parse_command: rules a JSON Schema cannot say (documented in the schema).
BEYOND_SCHEMA: dict[str, dict[str, Any]] = {
    "end before start": create(start=E, end=S),
    "end equal to start": create(end=S),
    "a booking in the past": create(start="2020-01-01T09:00:00Z", end="2020-01-01T10:00:00Z"),
    "an update in the past": {"key": "k", "type": "update", "room": ROOM, "booking_id": BOOKING,
                              "start": "2020-01-01T09:00:00Z", "end": "2020-01-01T10:00:00Z"},
    "availability longer than 42 days": {"key": "k", "type": "availability", "rooms": [ROOM], "start": S,
                                         "end": (SOON + timedelta(days=43)).strftime("%Y-%m-%dT%H:%M:%SZ")},
    "a date that does not exist": create(start=f"{SOON.year + 1}-02-30T09:00:00Z",
                                         end=f"{SOON.year + 1}-03-02T09:00:00Z"),
}

# Refused by the schema, still accepted by parse_command: protocol.py should refuse these too (reported).
LENIENT: dict[str, dict[str, Any]] = {
    "time without seconds": create(start=S[:16] + "Z"),
    "time with a space for T": create(start=S.replace("T", " ")),
    "basic ISO 8601 time": create(start=S.replace("-", "").replace(":", "")),
    "unknown field in a person": create(organizer={"email": "alice@contoso.com", "phone": "123"}),
    "a null attendee": create(attendees=[None]),
    "attendees as an empty string": create(attendees=""),
}


def parses(doc: Any) -> bool:
    try:
        protocol.parse_command(doc)
    except ProtocolError as e:
        assert e.key in ("invalid_command", "unsupported_command")
        return False
    return True


@pytest.mark.parametrize("name", sorted(GOOD))
def test_schema_and_parse_command_accept_a_good_command(name):
    doc = GOOD[name]
    assert COMMAND.is_valid(doc), [e.message for e in COMMAND.iter_errors(doc)]
    assert parses(doc)
    forwarded = protocol.command_to_json(protocol.parse_command(doc))  # what the hub relays to the gateway
    assert COMMAND.is_valid(forwarded), [e.message for e in COMMAND.iter_errors(forwarded)]
    assert protocol.parse_command(forwarded).request_hash() == protocol.parse_command(doc).request_hash()


@pytest.mark.parametrize("name", sorted(BAD))
def test_schema_and_parse_command_refuse_a_bad_command(name):
    doc = BAD[name]
    assert not COMMAND.is_valid(doc)
    assert not parses(doc)


@pytest.mark.parametrize("name", sorted(BEYOND_SCHEMA))
def test_parse_command_refuses_what_no_schema_can_say(name):
    assert COMMAND.is_valid(BEYOND_SCHEMA[name])
    assert not parses(BEYOND_SCHEMA[name])


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_the_schema_refuses_loose_input(name):
    assert not COMMAND.is_valid(LENIENT[name])


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_parse_command_refuses_loose_input(name):
    assert not parses(LENIENT[name])


@pytest.mark.parametrize("doc", [create(key="k-1\n"), create(room=ROOM + "\n")], ids=["key", "room"])
def test_parse_command_refuses_a_trailing_newline(doc):
    assert not parses(doc)
