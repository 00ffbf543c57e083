"""Hostile input at every parser of untrusted JSON, over real sockets: the hub's enrollment endpoint, the first
frame of its tunnel (both without any credentials), its vendor and admin APIs, a live tunnel in both directions,
the gateway's local API and `gateway enroll` reading a hub's answer.

Nesting deeper than protocol.MAX_JSON_DEPTH (json.loads itself recurses until a RecursionError near 1000 levels)
and unpaired UTF-16 surrogates (text that cannot be encoded, hashed or stored as UTF-8) are refused with the
endpoint's own invalid_* answer; nothing answers 500, drops the connection or logs a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.api import Api, EventHub
from gateway.config import RelayConfig
from gateway.errors import GatewayError
from gateway.model import Command, CommandResult, Room, accepted
from gateway.observability.metrics import Metrics
from gateway.relay import protocol
from gateway.relay.enroll import enroll
from gateway.relay.tunnel import Tunnel
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from tests.conftest import eventually
from tests.fake_gateway import FakeGateway
from tests.hub_fixtures import ADMIN, Hub

ROOM = "room1@contoso.com"
DEEP = 5000  # far below every size limit (10 KB), far above any sane nesting and json.loads's recursion limit
DEEP_ARRAY = "[" * DEEP + "]" * DEEP
LONE_SURROGATE = "\\ud800"  # as it appears in JSON text: an escape of half a character


def deep_object(field: str, outer: dict[str, Any]) -> str:
    """``outer`` with ``field`` nested DEEP levels deep: a well-formed JSON object of a few KB."""
    head = json.dumps(outer)[:-1]
    return f'{head}, "{field}": {DEEP_ARRAY}}}'


def soon(hours: float = 26) -> str:
    t = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def create_text(subject_json: str) -> str:
    """A create command whose subject is given as raw JSON text (to carry escapes json.dumps would not write)."""
    return (f'{{"key": "cmd-1", "type": "create", "room": "{ROOM}", "start": "{soon()}", "end": "{soon(27)}", '
            f'"subject": {subject_json}}}')


class QuietCheck:
    """What the servers logged meanwhile: no stack trace and nothing at error level, in structlog or stdlib."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.events: list[dict[str, Any]] = []

    def assert_quiet(self) -> None:
        loud = [e for e in self.events if e["log_level"] in ("error", "critical") or e.get("exc_info")]
        assert not loud, loud
        records = [r for r in self.caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not records, [(r.name, r.getMessage()) for r in records]


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[QuietCheck]:
    check = QuietCheck(caplog)
    with capture_logs() as events:
        check.events = events
        yield check


# -- the hub -------------------------------------------------------------------------------------------------------
async def post_raw(http: aiohttp.ClientSession, url: str, text: str,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(url, data=text.encode(), headers={"Content-Type": "application/json", **(headers or {})}) \
            as resp:
        body = await resp.text()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body


async def test_enrollment_refuses_deep_json_and_lone_surrogates_without_credentials(vendor, http, hub, quiet):
    url = hub.url + protocol.ENROLL_PATH
    deep = deep_object("name", {"token": "et_x", "public_key": "AAAA", "signature": "AAAA"})
    assert len(deep) < 20_000
    status, doc = await post_raw(http, url, deep)
    assert (status, doc["error"]) == (400, "invalid_json") and "nested more than" in doc["message"]
    status, doc = await post_raw(http, url, DEEP_ARRAY)
    assert (status, doc["error"]) == (400, "invalid_json")

    # a token that cannot be encoded (it is hashed to be looked up), and a name that cannot be stored
    await vendor.customer()
    token = await vendor.token()
    for body in (f'{{"token": "et_{LONE_SURROGATE}", "public_key": "AAAA", "signature": "AAAA"}}',
                 f'{{"token": "{token}", "public_key": "AAAA", "signature": "AAAA", "name": "gw{LONE_SURROGATE}"}}'):
        status, doc = await post_raw(http, url, body)
        assert (status, doc["error"]) == (400, "invalid_json"), doc
        assert "surrogate" in doc["message"]
    gw = FakeGateway()  # the token was not used up by any of it
    assert (await gw.enroll(http, hub.url, token))[0] == 201
    quiet.assert_quiet()


async def test_an_oversize_enrollment_body_is_413_too_large_not_a_crash(http, hub, quiet):
    # between the protocol's limit and aiohttp's own (twice it): the handler's own 413 (it once raised a TypeError)
    body = '{"token": "' + "x" * protocol.MAX_COMMAND_BYTES + '"}'
    status, doc = await post_raw(http, hub.url + protocol.ENROLL_PATH, body)
    assert (status, doc["error"]) == (413, "too_large") and str(protocol.MAX_COMMAND_BYTES) in doc["message"]


async def test_a_deep_or_undecodable_first_frame_closes_4400_with_bad_message(vendor, http, hub, quiet):
    tunnel = hub.url.replace("https", "wss", 1) + protocol.TUNNEL_PATH
    await vendor.customer()
    gw = await vendor.gateway()
    hellos = (
        DEEP_ARRAY,
        deep_object("agent", {"type": "hello", "protocol": 1, "gateway_id": gw.gateway_id}),
        # a gateway id that cannot be encoded (it is looked up in SQLite)
        f'{{"type": "hello", "protocol": 1, "gateway_id": "gw{LONE_SURROGATE}", "key_id": "k", "signature": "s"}}',
    )
    for hello in hellos:
        ws = await http.ws_connect(tunnel, protocols=(protocol.SUBPROTOCOL,))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "challenge"
        await ws.send_str(hello)
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        assert json.loads(msg.data)["code"] == "bad_message"
        close = await ws.receive(timeout=10)
        assert (close.type, close.data) == (aiohttp.WSMsgType.CLOSE, 4400)
        await ws.close()
    refused = [e for e in quiet.events if e["event"] == "hub.handshake_refused"]
    assert [e["reason"] for e in refused] == ["bad_handshake"] * 3
    assert {e["log_level"] for e in refused} <= {"info", "warning"}
    link = await gw.connect(http, hub.url)  # the hub is fine
    assert link.welcome["type"] == "welcome"
    await link.close()
    quiet.assert_quiet()


async def test_a_live_tunnel_answers_a_deep_frame_with_bad_message_and_stays_up(vendor, http, hub, quiet):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    await link.ws.send_str(deep_object("events", {"type": "events"}))
    error = await link.recv()
    assert (error["type"], error["code"]) == ("error", "bad_message") and "nested" in error["message"]
    await link.ws.send_str(f'{{"type": "error", "code": "x", "message": "{LONE_SURROGATE}"}}')
    assert (await link.recv())["code"] == "bad_message"
    big_seq = {"seq": protocol.MAX_SEQ + 1, "room_seq": 1,
               "event": {"specversion": "1.0", "id": "e1", "source": "s", "type": "t"}}
    assert (await link.events([big_seq]))["code"] == "bad_message"  # SQLite could not store it
    ok = {"seq": 1, "room_seq": 1, "event": {"specversion": "1.0", "id": "e1", "source": "s", "type": "t"}}
    assert await link.events([ok]) == {"type": "ack", "seq": 1}
    await link.close()
    quiet.assert_quiet()


async def test_the_vendor_and_admin_apis_refuse_deep_json_with_400(vendor, http, hub, quiet):
    key = await vendor.customer()
    status, doc = await post_raw(http, hub.url + "/v1/customers/contoso/commands", DEEP_ARRAY,
                                 {"Authorization": f"Bearer {key}"})
    assert (status, doc["reason"], doc["key"]) == (400, "invalid_command", "")
    assert "nested more than" in doc["message"]
    status, doc = await post_raw(http, hub.url + "/v1/customers/contoso/commands", create_text(f'"{LONE_SURROGATE}"'),
                                 {"Authorization": f"Bearer {key}"})
    assert (status, doc["reason"]) == (400, "invalid_command") and "surrogate" in doc["message"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for path in ("/admin/v1/customers", "/admin/v1/customers/contoso/enrollment-tokens"):
        status, doc = await post_raw(http, hub.url + path, DEEP_ARRAY, admin)
        assert (status, doc["error"]) == (400, "invalid_json"), path
    status, doc = await post_raw(http, hub.url + "/admin/v1/customers",
                                 f'{{"id": "fabrikam", "name": "F{LONE_SURROGATE}"}}', admin)
    assert (status, doc["error"]) == (400, "invalid_json")
    quiet.assert_quiet()


# -- the gateway's tunnel ------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.seen: list[Command] = []

    async def execute(self, cmd: Command) -> CommandResult:
        self.seen.append(cmd)
        return accepted(cmd, "ok")


async def test_the_gateways_tunnel_answers_hostile_frames_from_the_hub_and_stays_up(
        hub: Hub, tmp_path: Path, pki: Any, quiet: QuietCheck, vault: Vault) -> None:
    await hub.hub.write(hub.hub.store.add_customer, "acme", "Acme")
    token, _ = await hub.hub.write(hub.hub.store.issue_token, "acme", timedelta(hours=1))
    identity = await enroll(hub.url, token, vault=vault, relay=RelayConfig(ca_bundle=pki.ca_file), name="gw")
    store = SqliteStore(tmp_path / "gateway.db")
    store.upsert_room(Room(ROOM))
    commands = Recorder()
    tunnel = Tunnel(RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file), identity, store,
                    commands, rng=random.Random(1))
    task = asyncio.create_task(tunnel.run())
    try:
        await eventually(lambda: tunnel.state == "connected", what="the tunnel to connect")
        session = hub.hub.sessions[identity.gateway_id]
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        session.pending["bad-1"] = answer
        await session.send('{"type": "command", "command": {"key": "deep", "x": ' + DEEP_ARRAY + "}}")
        command = {"key": "bad-1", "type": "create", "room": ROOM, "start": soon(), "end": soon(27)}
        await session.send(protocol.encode("command", command=command)[:-2] + f',"subject":"{LONE_SURROGATE}"}}}}')

        def errors() -> list[str]:
            return [e["code"] for e in quiet.events if e["event"] == "hub.gateway_error"]

        await eventually(lambda: len(errors()) >= 2, what="the gateway's two error messages")
        assert errors() == ["bad_message", "bad_message"]
        assert commands.seen == [] and tunnel.state == "connected" and not answer.done()
        assert hub.hub.sessions[identity.gateway_id] is session  # the same connection
    finally:
        await tunnel.close()
        await asyncio.gather(task, return_exceptions=True)
        store.close()
    quiet.assert_quiet()


async def test_gateway_enroll_reads_a_hostile_hubs_answer_as_a_protocol_error(
        tmp_path: Path, pki: Any, aiohttp_server: Any, vault: Vault) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=DEEP_ARRAY, status=201, content_type="application/json")

    app = web.Application()
    app.router.add_post(protocol.ENROLL_PATH, answer)
    server = await aiohttp_server(app, ssl=pki.server_context())
    relay = RelayConfig(ca_bundle=pki.ca_file)
    with pytest.raises(GatewayError) as e:
        await enroll(f"https://127.0.0.1:{server.port}", "et_token", vault=vault, relay=relay, name="gw")
    assert e.value.key == "bad_message"
    assert not GatewayIdentity.exists(vault) or not GatewayIdentity.load(vault).enrolled


# -- the local API -------------------------------------------------------------------------------------------------
@pytest.fixture
async def local_api(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[tuple[Any, Recorder, dict[str, str]]]:
    store = SqliteStore(tmp_path / "g.sqlite")
    store.upsert_room(Room(ROOM, state="verified"))
    keys = ApiKeys(store)
    commands = Recorder()
    api = Api(store, Metrics(), EventHub(), room_states=lambda: {}, ready=lambda: True, keys=keys, commands=commands)
    client = await aiohttp_client(api.app())
    yield client, commands, {"Authorization": f"Bearer {keys.create('booking', ['book'])}"}
    api.close()
    store.close()


async def test_the_local_api_refuses_deep_json_and_a_lone_surrogate_as_invalid_command(local_api, quiet):
    client, commands, auth = local_api
    headers = {**auth, "Content-Type": "application/json"}
    for body in (DEEP_ARRAY, deep_object("subject", {"key": "cmd-1", "type": "create"})):
        resp = await client.post("/v1/commands", data=body.encode(), headers=headers)
        doc = await resp.json()
        assert (resp.status, doc["status"], doc["reason"]) == (400, "failed", "invalid_command"), doc
        assert "nested more than" in doc["message"]
    resp = await client.post("/v1/commands", data=create_text(f'"Stand-up {LONE_SURROGATE}"').encode(),
                             headers=headers)
    doc = await resp.json()
    assert (resp.status, doc["reason"]) == (400, "invalid_command") and "$.subject" in doc["message"]
    resp = await client.post("/v1/commands", data=create_text('"Stand-up \\ud83d\\ude00"').encode(), headers=headers)
    assert resp.status == 200  # a surrogate pair is one character (an emoji): accepted
    assert [c.subject for c in commands.seen] == ["Stand-up \U0001F600"]
    quiet.assert_quiet()


def test_parse_command_names_a_field_with_a_lone_surrogate() -> None:
    doc = {"key": "k-1", "type": "create", "room": ROOM, "start": soon(), "end": soon(27),
           "booker": {"name": "Front desk \ud800"}}
    with pytest.raises(GatewayError) as e:
        protocol.parse_command(doc)
    assert e.value.key == "invalid_command" and "$.booker.name" in str(e.value)
    assert getattr(e.value, "command_key", None) == "k-1"


@pytest.mark.parametrize("text, ok", [
    ('{"a": [1, {"b": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}', True),  # brackets in strings do not count
    ("[" * protocol.MAX_JSON_DEPTH + "]" * protocol.MAX_JSON_DEPTH, True),
    ("[" * (protocol.MAX_JSON_DEPTH + 1) + "]" * (protocol.MAX_JSON_DEPTH + 1), False),
    ('{"a":' * (protocol.MAX_JSON_DEPTH + 1) + "1" + "}" * (protocol.MAX_JSON_DEPTH + 1), False),
    ("[" * 1_000_000, False),
    ('"\\ud83d\\ude00"', True),
    ('"\\\\ud800"', True),  # an escaped backslash, then text
    ('["\\udc00"]', False),
    (b"\xff", False),
])
def test_bounded_loads(text: str | bytes, ok: bool) -> None:
    if ok:
        assert protocol.loads(text) == json.loads(text)
    else:
        with pytest.raises(ValueError):
            protocol.loads(text)
