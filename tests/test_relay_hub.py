"""The reference hub over real TLS, driven by a minimal gateway written from docs/relay-protocol.md (fake_gateway.py).

Everything goes through sockets: the hub (aiohttp, TLS with the test CA), its SQLite file in tmp_path, a webhook
receiver with its own TLS server, and the `gateway hub` administration commands on the hub's data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.hub import cli as hubcli
from gateway.hub import webhooks
from gateway.hub.server import FRAME_HARD_LIMIT, start_hub
from gateway.hub.store import EventItem, HubStore
from gateway.model import EVENT_TYPES
from gateway.relay import protocol
from tests.conftest import eventually
from tests.fake_gateway import ROOM, T0, FakeGateway, cloud_event, create_command, items
from tests.hub_fixtures import ADMIN, Vendor


# -- helpers -----------------------------------------------------------------------------------------------------
async def read_sse(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async with asyncio.timeout(10):
        while len(out) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line == "":
                if "data" in current:
                    out.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    return out


def cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    hubcli.register_cli(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    code = hubcli.run_cli(parser.parse_args(list(argv)), env={}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- enrollment --------------------------------------------------------------------------------------------------
async def test_enrollment_token_is_single_use_expires_and_needs_the_key(vendor, http, hub, hub_settings):
    await vendor.customer()
    token = await vendor.token()

    forger = FakeGateway()
    public = forger.public_b64(forger.key)
    wrong = {"token": token, "public_key": public, "name": "x",
             "signature": protocol.b64(Ed25519PrivateKey.generate().sign(protocol.signed_enrollment(token, public)))}
    async with http.post(hub.url + protocol.ENROLL_PATH, json=wrong) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "bad_signature"

    gw = FakeGateway()
    status, doc = await gw.enroll(http, hub.url, token)  # the refused attempt did not use the token up
    assert status == 201
    assert doc["customer"] == "contoso" and doc["key_id"] == gw.key_id and doc["gateway_id"].startswith("gw_")
    assert doc["tunnel_url"] == hub.url.replace("https", "wss", 1) + protocol.TUNNEL_PATH

    status, doc = await FakeGateway().enroll(http, hub.url, token)
    assert (status, doc["error"]) == (410, "token_used")
    status, doc = await FakeGateway().enroll(http, hub.url, "et_never-issued")
    assert (status, doc["error"]) == (401, "invalid_token")

    store = HubStore.in_dir(hub_settings.data_dir)  # what `gateway hub token` does, with a token born expired
    try:
        expired, _ = store.issue_token("contoso", timedelta(seconds=-1))
    finally:
        store.close()
    status, doc = await FakeGateway().enroll(http, hub.url, expired)
    assert (status, doc["error"]) == (410, "token_expired")
    assert "message" in doc


async def test_tokens_are_stored_hashed(vendor, hub_settings):
    await vendor.customer()
    token = await vendor.token()
    api_key = await vendor.customer("fabrikam")
    raw = (hub_settings.data_dir / "hub.db").read_bytes()
    wal = hub_settings.data_dir / "hub.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert token.encode() not in raw and api_key.encode() not in raw


# -- handshake ---------------------------------------------------------------------------------------------------
async def test_handshake_welcomes_an_enrolled_gateway(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    assert link.ws.protocol == protocol.SUBPROTOCOL
    assert len(protocol.unb64(link.challenge["nonce"])) == protocol.NONCE_BYTES
    w = link.welcome
    assert w["type"] == "welcome" and w["ack"] == 0 and w["window"] == protocol.DEFAULT_WINDOW
    assert w["heartbeat"] == 5.0 and w["session"]
    status, doc = await vendor.call("GET", "/admin/v1/gateways")
    assert status == 200 and doc["gateways"][0]["connected"] is True and doc["gateways"][0]["agent"] == "fake/1"
    await link.close()


async def test_a_replayed_hello_is_refused(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    first = await gw.connect(http, hub.url)
    assert first.welcome["type"] == "welcome"
    replay = await gw.connect(http, hub.url, hello=first.hello)  # a recorded hello, answering the old nonce
    assert replay.welcome["type"] == "error" and replay.welcome["code"] == "unauthorized"
    assert await replay.closed() == 4401
    await first.close()


async def test_unknown_gateway_wrong_key_and_other_protocols_are_refused(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url, key=Ed25519PrivateKey.generate())
    assert (link.welcome.get("code"), await link.closed()) == ("unauthorized", 4401)

    stranger = FakeGateway()
    stranger.gateway_id = "gw_nobody"
    link = await stranger.connect(http, hub.url)
    assert (link.welcome.get("code"), await link.closed()) == ("unauthorized", 4401)

    link = await gw.connect(http, hub.url, hello={"protocol": 2, "gateway_id": gw.gateway_id, "key_id": gw.key_id,
                                                  "signature": "x", "agent": "future/9", "last_seq": 0})
    assert (link.welcome.get("code"), await link.closed()) == ("unsupported_protocol", 4400)

    ws = await http.ws_connect(hub.url.replace("https", "wss", 1) + protocol.TUNNEL_PATH)  # no subprotocol
    first = json.loads((await ws.receive()).data)
    assert first["code"] == "unsupported_protocol"
    await ws.close()


async def test_handshake_without_hello_is_closed(hub_settings, http):
    running = await start_hub(replace(hub_settings, hello_timeout=0.5))  # the silence below lasts this long
    try:
        ws = await http.ws_connect(running.url.replace("https", "wss", 1) + protocol.TUNNEL_PATH,
                                   protocols=(protocol.SUBPROTOCOL,))
        assert json.loads((await ws.receive()).data)["type"] == "challenge"
        await ws.send_str(protocol.encode("events", events=[]))
        error = json.loads((await ws.receive()).data)
        assert error["code"] == "unexpected"
        assert (await ws.receive()).data == 4400

        ws = await http.ws_connect(running.url.replace("https", "wss", 1) + protocol.TUNNEL_PATH,
                                   protocols=(protocol.SUBPROTOCOL,))
        await ws.receive()  # the challenge; then silence
        error = json.loads((await ws.receive(timeout=10)).data)
        assert error["code"] == "unexpected" and "hello" in error["message"]
        assert (await ws.receive()).data == 4408
    finally:
        await running.close()


async def test_a_new_connection_replaces_the_old_one(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    old = await gw.connect(http, hub.url)
    new = await gw.connect(http, hub.url)
    assert new.welcome["type"] == "welcome"
    assert await old.closed() == 4409
    assert old.ws.close_code == 4409  # a clean closing handshake: aiohttp's echo of the close went through
    assert (await new.events(items([cloud_event("created", "u1")])))["type"] == "ack"  # the new one serves
    await new.close()


# -- revocation --------------------------------------------------------------------------------------------------
async def test_revoked_gateway_is_refused_and_its_live_session_ended(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    status, doc = await vendor.call("POST", f"/admin/v1/gateways/{gw.gateway_id}/revoke")
    assert status == 200 and doc["revoked_at"]
    error = await link.recv()
    assert (error["type"], error["code"]) == ("error", "revoked")
    assert await link.closed() == 4403
    assert link.ws.close_code == 4403  # not 1006: the hub waited for the close to be echoed

    again = await gw.connect(http, hub.url)
    assert again.welcome["code"] == "revoked"
    assert await again.closed() == 4403


async def test_a_cli_revoke_on_the_data_directory_ends_a_live_session(vendor, http, hub, hub_settings):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    code, out, _ = await asyncio.to_thread(cli, "hub", "revoke", str(gw.gateway_id), "--data",
                                           str(hub_settings.data_dir))
    assert code == 0 and "revoked" in out
    assert (await link.recv())["code"] == "revoked"  # the hub noticed the file changed under it
    assert await link.closed() == 4403


# -- events ------------------------------------------------------------------------------------------------------
async def test_events_are_stored_deduplicated_acked_and_projected(vendor, http, hub):
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    room_event = cloud_event("room_state", "", room_seq=1)
    b1 = cloud_event("created", "uid-1", room_seq=2)
    b2 = cloud_event("created", "uid-2", start=T0 + timedelta(hours=3), room_seq=3)
    first = [{"seq": 1, "room_seq": 1, "event": room_event}, {"seq": 2, "room_seq": 2, "event": b1},
             {"seq": 3, "room_seq": 3, "event": b2}]
    assert await link.events(first) == {"type": "ack", "seq": 3}

    moved = cloud_event("updated", "uid-1", start=T0 + timedelta(hours=1), room_seq=4)
    gone = cloud_event("deleted", "uid-2", start=T0 + timedelta(hours=3), room_seq=5)
    # after a reconnect the gateway sends 2 and 3 again: dropped, but acknowledged
    again = [*first[1:], {"seq": 4, "room_seq": 4, "event": moved}, {"seq": 5, "room_seq": 5, "event": gone}]
    assert await link.events(again) == {"type": "ack", "seq": 5}

    status, doc = await vendor.call("GET", "/v1/customers/contoso/rooms", token=key)
    assert status == 200
    assert [(r["email"], r["state"], r["gateway_connected"]) for r in doc["rooms"]] == [(ROOM, "verified", True)]
    status, doc = await vendor.call("GET", f"/v1/customers/contoso/rooms/{ROOM}/bookings?start="
                                           f"{T0:%Y-%m-%dT%H:%M:%SZ}&end={T0 + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}",
                                    token=key)
    assert status == 200
    moved_start = f"{T0 + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"
    assert [(b["uid"], b["start"]) for b in doc["bookings"]] == [("uid-1", moved_start)]
    assert doc["bookings"][0] == moved["data"]

    async with vendor.http.get(hub.url + "/v1/customers/contoso/events",
                               headers={"Authorization": f"Bearer {key}"}) as resp:
        got = await read_sse(resp, 5)
    assert [int(e["id"]) for e in got] == [1, 2, 3, 4, 5]
    assert [json.loads(e["data"])["id"] for e in got] == [e["id"] for e in (room_event, b1, b2, moved, gone)]
    assert got[1]["event"] == EVENT_TYPES["created"]
    await link.close()


async def test_availability_lists_busy_intervals_from_the_stored_bookings(vendor, http, hub):
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    evs = [cloud_event("created", "busy-1"),
           cloud_event("created", "free-1", start=T0 + timedelta(hours=2), free_busy="free"),
           cloud_event("created", "gone-1", start=T0 + timedelta(hours=4), cancelled=True),
           cloud_event("created", "other", room="room2@contoso.com", start=T0 + timedelta(hours=1), minutes=30)]
    assert (await link.events(items(evs)))["seq"] == 4
    day = f"start={T0:%Y-%m-%dT%H:%M:%SZ}&end={T0 + timedelta(hours=12):%Y-%m-%dT%H:%M:%SZ}"
    status, doc = await vendor.call("GET", f"/v1/customers/contoso/availability?rooms={ROOM},room2@contoso.com&{day}",
                                    token=key)
    assert status == 200
    assert doc["rooms"] == {
        ROOM: [{"start": f"{T0:%Y-%m-%dT%H:%M:%SZ}", "end": f"{T0 + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}",
                "status": "busy"}],
        "room2@contoso.com": [{"start": f"{T0 + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}",
                               "end": f"{T0 + timedelta(minutes=90):%Y-%m-%dT%H:%M:%SZ}", "status": "busy"}]}
    status, doc = await vendor.call("GET", "/v1/customers/contoso/availability?rooms=", token=key)
    assert (status, doc["error"]) == (400, "invalid_rooms")
    await link.close()


async def test_hub_restart_keeps_events_and_the_ack(hub_settings, http):
    running = await start_hub(hub_settings)
    vendor = Vendor(http, running.url)
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, running.url)
    sent = [cloud_event("created", f"u{n}", start=T0 + timedelta(hours=n), room_seq=n + 1) for n in range(3)]
    assert (await link.events(items(sent)))["seq"] == 3
    await running.close()
    assert await link.closed() == 1001  # going away

    running = await start_hub(hub_settings)
    try:
        link = await gw.connect(http, running.url, last_seq=3)
        assert link.welcome["ack"] == 3
        more = cloud_event("created", "u3", start=T0 + timedelta(hours=3), room_seq=4)
        assert (await link.events([*items(sent)[1:], {"seq": 4, "room_seq": 4, "event": more}]))["seq"] == 4
        async with http.get(running.url + "/v1/customers/contoso/events",
                            headers={"Authorization": f"Bearer {key}"}) as resp:
            got = await read_sse(resp, 4)
        assert [json.loads(e["data"])["id"] for e in got] == [e["id"] for e in [*sent, more]]
        await link.close()
    finally:
        await running.close()


async def test_a_gateway_whose_store_restarted_is_taken_back_to_its_own_last_seq(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    assert (await link.events(items([cloud_event("created", f"u{n}") for n in range(3)])))["seq"] == 3
    await link.close()
    link = await gw.connect(http, hub.url, last_seq=1)  # a restored backup: it only ever wrote seq 1
    assert link.welcome["ack"] == 1
    assert await link.events(items([cloud_event("created", "new")], first_seq=2)) == {"type": "ack", "seq": 2}
    await link.close()


async def test_sse_resumes_after_last_event_id_and_keeps_alive(vendor, http, hub):
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    evs = [cloud_event("created", f"u{n}", room_seq=n + 1) for n in range(4)]
    await link.events(items(evs[:2]))
    auth = {"Authorization": f"Bearer {key}"}
    async with http.get(hub.url + "/v1/customers/contoso/events", headers=auth) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert [e["id"] for e in await read_sse(resp, 2)] == ["1", "2"]
        await link.events(items(evs[2:], first_seq=3))  # live: the open stream gets it without polling
        assert [e["id"] for e in await read_sse(resp, 1)] == ["3"]
        async with asyncio.timeout(10):
            while (await resp.content.readline()) != b": ping\n":  # aiohttp-sse's keep-alive comment
                pass
    async with http.get(hub.url + "/v1/customers/contoso/events", headers={**auth, "Last-Event-ID": "3"}) as resp:
        got = await read_sse(resp, 1)
    assert got[0]["id"] == "4" and json.loads(got[0]["data"])["id"] == evs[3]["id"]
    status, doc = await vendor.call("GET", "/v1/customers/contoso/events?after=x", token=key)
    assert (status, doc["error"]) == (400, "invalid_last_event_id")
    await link.close()


# -- bad frames --------------------------------------------------------------------------------------------------
async def test_bad_frames_get_an_error_and_the_tunnel_stays_up(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    await link.ws.send_str("this is not json")
    assert (await link.recv())["code"] == "bad_message"
    await link.ws.send_str('{"type": "coffee"}')
    assert (await link.recv())["code"] == "bad_message"
    await link.send("welcome", ack=0, session="x", window=1, heartbeat=1)
    assert await link.recv() == {"type": "error", "code": "unexpected", "ref": "welcome",
                                 "message": "a gateway does not send 'welcome' here"}
    await link.ws.send_str('{"type":"events","events":[],"pad":"' + "x" * protocol.MAX_MESSAGE_BYTES + '"}')
    assert (await link.recv())["code"] == "too_large"
    await link.ws.send_bytes(b'{"type":"events"}')
    assert (await link.recv())["code"] == "bad_message"
    bad_seq = items([cloud_event("created", "a"), cloud_event("created", "b")])
    bad_seq[1]["seq"] = 1
    error = await link.events(bad_seq)
    assert (error["code"], error["ref"]) == ("bad_message", "events")
    not_cloudevent = [{"seq": 1, "room_seq": 1, "event": {"id": "x"}}]
    assert (await link.events(not_cloudevent))["code"] == "bad_message"
    await link.send("result", result={"status": "accepted"})
    assert (await link.recv())["ref"] == "result"
    await link.send("rotate_key", public_key="AAAA", key_id="k_x", signature="AAAA")
    assert (await link.recv())["ref"] == "rotate_key"
    assert await link.events(items([cloud_event("created", "ok")])) == {"type": "ack", "seq": 1}
    await link.close()


async def test_a_frame_above_the_hard_limit_is_closed_1009_and_logged_as_such(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    with capture_logs() as logs:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await link.ws.send_str("x" * (FRAME_HARD_LIMIT + 1))
        assert await link.closed() == 1009
        await eventually(lambda: [e for e in logs if e["event"] == "hub.gateway_disconnected"],
                         what="the hub to log the end of the session")
    assert [(e["close_code"], e["closed_by"]) for e in logs if e["event"] == "hub.gateway_disconnected"] == \
        [(1009, "hub")]
    assert [e["log_level"] for e in logs if e["event"] == "hub.frame_too_large"] == ["warning"]
    again = await gw.connect(http, hub.url)  # and it may come back
    assert again.welcome["type"] == "welcome"
    await again.close()


# -- key rotation ------------------------------------------------------------------------------------------------
async def test_key_rotation_without_downtime(vendor, http, hub):
    await vendor.customer()
    gw = await vendor.gateway()
    old_key = gw.key
    link = await gw.connect(http, hub.url)
    new_key = Ed25519PrivateKey.generate()
    new_id = FakeGateway.key_id_of(new_key)
    assert gw.gateway_id is not None

    stale = new_key.sign(protocol.signed_rotation("another-nonce", gw.gateway_id, new_id))
    await link.send("rotate_key", public_key=FakeGateway.public_b64(new_key), key_id=new_id,
                    signature=protocol.b64(stale))
    assert await link.recv() == {"type": "error", "code": "unauthorized", "ref": "rotate_key", "message":
                                 "the signature by the new key over this session's challenge does not verify"}
    signature = new_key.sign(protocol.signed_rotation(link.challenge["nonce"], gw.gateway_id, new_id))
    await link.send("rotate_key", public_key=FakeGateway.public_b64(new_key), key_id=new_id,
                    signature=protocol.b64(signature))
    assert await link.recv() == {"type": "key_rotated", "key_id": new_id}
    await link.close()

    # a gateway that crashed before saving its new key still gets in with the old one
    link = await gw.connect(http, hub.url, key=old_key)
    assert link.welcome["type"] == "welcome"
    await link.close()
    link = await gw.connect(http, hub.url, key=new_key)
    assert link.welcome["type"] == "welcome"
    await link.close()
    # the first connection with the new key retired the old one
    link = await gw.connect(http, hub.url, key=old_key)
    assert link.welcome["code"] == "unauthorized"
    _, doc = await vendor.call("GET", "/admin/v1/gateways")
    assert doc["gateways"][0]["keys"] == [new_id]


# -- commands ----------------------------------------------------------------------------------------------------
async def test_commands_round_trip_to_the_gateway(vendor, http, hub):
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    call = asyncio.create_task(vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                           body=create_command()))
    msg = await link.recv()
    assert msg["type"] == "command"
    assert msg["command"] == protocol.command_to_json(protocol.parse_command(create_command()))
    assert msg["command"]["room"] == ROOM  # normalized by the hub's validation
    await link.send("result", result={"key": "cmd-1", "status": "accepted", "booking_id": "b" * 32, "uid": "u-1"})
    status, doc = await call
    assert status == 200
    assert doc == {"key": "cmd-1", "status": "accepted", "booking_id": "b" * 32, "uid": "u-1"}

    call = asyncio.create_task(vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                           body=create_command("cmd-2")))
    await link.recv()
    await link.send("result", result={"key": "cmd-2", "status": "declined", "reason": "conflict",
                                      "message": "the room is booked"})
    status, doc = await call
    assert (status, doc["status"], doc["reason"]) == (200, "declined", "conflict")
    await link.close()


async def test_invalid_commands_get_a_failed_result_without_reaching_the_gateway(vendor, http, hub):
    key = await vendor.customer()
    path = "/v1/customers/contoso/commands"
    status, doc = await vendor.call("POST", path, token=key, body=create_command(end="2020-01-01T00:00:00Z"))
    assert status == 400
    assert doc["key"] == "cmd-1" and doc["reason"] == "invalid_command"
    assert doc["retryable"] is False and doc["message"]
    status, doc = await vendor.call("POST", path, token=key, body={"type": "create"})
    assert (status, doc["key"], doc["reason"]) == (400, "", "invalid_command")
    status, doc = await vendor.call("POST", path, token=key, body={"key": "k", "type": "teleport"})
    assert (status, doc["reason"]) == (400, "unsupported_command")
    async with http.post(hub.url + path, data=b"{not json", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 400 and (await resp.json())["reason"] == "invalid_command"
    big = create_command(subject="x" * (protocol.MAX_COMMAND_BYTES + 10))
    status, doc = await vendor.call("POST", path, token=key, body=big)
    assert (status, doc["reason"]) == (413, "too_large")


async def test_commands_without_a_gateway_or_when_the_tunnel_drops_fail_retryably(vendor, http, hub):
    key = await vendor.customer()
    path = "/v1/customers/contoso/commands"
    status, doc = await vendor.call("POST", path, token=key, body=create_command())
    assert status == 503
    assert doc == {"key": "cmd-1", "status": "failed", "reason": "gateway_offline", "retryable": True,
                             "message": doc["message"]}
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    call = asyncio.create_task(vendor.call("POST", path, token=key, body=create_command()))
    assert (await link.recv())["type"] == "command"
    await link.close()
    status, doc = await call
    assert (status, doc["reason"], doc["retryable"]) == (503, "gateway_offline", True)


async def test_a_duplicate_key_in_flight_waits_for_the_same_result(vendor, http, hub):
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    path = "/v1/customers/contoso/commands"
    first = asyncio.create_task(vendor.call("POST", path, token=key, body=create_command()))
    assert (await link.recv())["command"]["key"] == "cmd-1"
    second = asyncio.create_task(vendor.call("POST", path, token=key, body=create_command()))
    await eventually(lambda: hub.hub.waiting("contoso", "cmd-1") == 2, what="the second request to join")
    status, doc = await vendor.call("POST", path, token=key, body=create_command(subject="Another"))
    assert (status, doc["reason"]) == (409, "idempotency_conflict")
    await link.send("result", result={"key": "cmd-1", "status": "accepted", "booking_id": "c" * 32})
    assert (await first) == (await second) == (200, {"key": "cmd-1", "status": "accepted", "booking_id": "c" * 32})
    # exactly one command reached the gateway: the next frame it gets is the ack of this batch
    assert (await link.events(items([cloud_event("created", "x")])))["type"] == "ack"
    await link.close()


async def test_a_command_the_gateway_does_not_answer_times_out(hub_settings, http):
    running = await start_hub(replace(hub_settings, command_timeout=0.3))
    try:
        vendor = Vendor(http, running.url)
        key = await vendor.customer()
        gw = await vendor.gateway()
        link = await gw.connect(http, running.url)
        status, doc = await vendor.call("POST", "/v1/customers/contoso/commands", token=key, body=create_command())
        assert (status, doc["reason"], doc["retryable"]) == (504, "gateway_offline", True)
        assert (await link.recv())["type"] == "command"
        await link.send("result", result={"key": "cmd-1", "status": "accepted"})  # late: dropped, no harm
        assert (await link.events(items([cloud_event("created", "x")])))["type"] == "ack"
        await link.close()
    finally:
        await running.close()


# -- the vendor API's scope --------------------------------------------------------------------------------------
async def test_a_vendor_key_only_reaches_its_own_customer(vendor, hub):
    contoso = await vendor.customer("contoso")
    await vendor.customer("fabrikam")
    assert (await vendor.call("GET", "/v1/customers/contoso/rooms", token=contoso))[0] == 200
    status, doc = await vendor.call("GET", "/v1/customers/fabrikam/rooms", token=contoso)
    assert (status, doc["error"]) == (403, "insufficient_scope") and "another customer" in doc["message"]
    status, doc = await vendor.call("POST", "/v1/customers/fabrikam/commands", token=contoso, body=create_command())
    assert status == 403
    status, doc = await vendor.call("GET", "/v1/customers/contoso/rooms", token=None)
    assert (status, doc["error"]) == (401, "missing_api_key")  # the local API's scheme and codes
    status, doc = await vendor.call("GET", "/v1/customers/contoso/rooms", token="ck_guessed")
    assert (status, doc["error"]) == (401, "invalid_api_key")
    status, doc = await vendor.call("GET", "/v1/customers/contoso/events", token="ck_guessed")
    assert status == 401
    status, doc = await vendor.call("GET", "/admin/v1/gateways", token=contoso)  # a vendor key is no admin token
    assert (status, doc["error"]) == (403, "insufficient_scope")
    status, doc = await vendor.call("GET", f"/v1/customers/contoso/rooms/{ROOM}/bookings", token=contoso)
    assert (status, doc["error"]) == (404, "room_unknown")
    status, doc = await vendor.call("GET", "/nowhere", token=None)
    assert (status, doc["error"]) == (404, "not_found")


async def test_the_hub_serves_its_openapi_document_and_problem_details(vendor, http, hub):
    status, doc = await vendor.call("GET", "/openapi.json", token=None)
    assert status == 200 and doc["info"]["title"].endswith("reference hub")
    assert "/v1/customers/{customer}/events" in doc["paths"]
    async with http.get(hub.url + "/v1/customers/contoso/rooms") as resp:
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        problem = await resp.json()
    assert (problem["status"], problem["error"], problem["detail"]) == (401, "missing_api_key", problem["message"])


async def test_admin_api_validates_its_input(vendor):
    status, doc = await vendor.call("POST", "/admin/v1/customers", body={"id": "Not Valid!"})
    assert (status, doc["error"]) == (400, "invalid_customer_id")
    await vendor.customer()
    status, doc = await vendor.call("POST", "/admin/v1/customers", body={"id": "contoso"})
    assert (status, doc["error"]) == (409, "customer_exists")
    status, doc = await vendor.call("POST", "/admin/v1/customers/nobody/enrollment-tokens")
    assert (status, doc["error"]) == (404, "customer_unknown")
    status, doc = await vendor.call("POST", "/admin/v1/customers/contoso/enrollment-tokens",
                                    body={"ttl_seconds": -5})
    assert (status, doc["error"]) == (400, "invalid_ttl")
    status, doc = await vendor.call("POST", "/admin/v1/customers/contoso/enrollment-tokens", body={"ttl_seconds": 60})
    expires = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert status == 201 and timedelta(seconds=50) < expires - datetime.now(UTC) <= timedelta(seconds=61)
    status, doc = await vendor.call("PUT", "/admin/v1/customers/contoso/webhook", body={"url": "http://plain"})
    assert (status, doc["error"]) == (400, "invalid_url")
    status, doc = await vendor.call("POST", "/admin/v1/gateways/gw_nobody/revoke")
    assert (status, doc["error"]) == (404, "gateway_unknown")
    status, doc = await vendor.call("GET", "/admin/v1/gateways", token="wrong-token-but-long-enough")
    assert status == 401


# -- webhooks ----------------------------------------------------------------------------------------------------
@pytest.fixture
async def receiver(pki) -> AsyncIterator[dict[str, Any]]:
    """A webhook endpoint over TLS that fails its first request with 500."""
    state: dict[str, Any] = {"requests": [], "answers": [500]}

    async def hook(request: web.Request) -> web.Response:
        state["requests"].append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=state["answers"].pop(0) if state["answers"] else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context())
    await site.start()
    state["url"] = f"https://localhost:{runner.addresses[0][1]}/hook"
    yield state
    await runner.cleanup()


async def test_webhooks_are_signed_ordered_and_retried(vendor, http, hub, receiver):
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    await link.events(items([cloud_event("created", "before")]))  # before the webhook existed: not sent
    status, doc = await vendor.call("PUT", "/admin/v1/customers/contoso/webhook", body={"url": receiver["url"]})
    assert status == 200 and doc["secret"].startswith("whsec_")
    secret = doc["secret"]
    evs = [cloud_event("created", f"w{n}", room_seq=n + 2) for n in range(3)]
    assert (await link.events(items(evs, first_seq=2)))["seq"] == 4

    await eventually(lambda: len(receiver["requests"]) == 4, what="three events, one of them twice")
    ids = [h["webhook-id"] for h, _ in receiver["requests"]]
    assert ids == [evs[0]["id"], evs[0]["id"], evs[1]["id"], evs[2]["id"]]  # retried, then in order
    for headers, body in receiver["requests"]:
        assert headers["content-type"] == "application/json"
        assert headers["webhook-signature"].startswith("v1,")
        assert webhooks.verify(secret, headers, body)
        assert json.loads(body)["id"] == headers["webhook-id"]
    headers, body = receiver["requests"][-1]
    assert json.loads(body) == evs[2]  # the CloudEvent as the gateway sent it
    assert not webhooks.verify(secret, headers, body + b" ")
    assert not webhooks.verify("whsec_" + "A" * 32, headers, body)
    assert not webhooks.verify(secret, {**headers, "webhook-timestamp": "1000"}, body)

    async def delivered() -> bool:
        return (await vendor.call("GET", "/admin/v1/customers/contoso/webhook"))[1]["cursor"] == 4

    await eventually(delivered, what="the cursor to move past the last event")
    await link.close()


def test_webhook_signature_matches_the_standard_webhooks_reference_vector():
    # From the Standard Webhooks specification's test vectors.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_a_webhook_endpoint_with_an_untrusted_certificate_gets_nothing(vendor, http, hub, receiver, pki,
                                                                              hub_settings):
    running = await start_hub(replace(hub_settings, data_dir=hub_settings.data_dir.parent / "other",
                                      webhook_ca_file=pki.other_ca_file))
    try:
        other = Vendor(http, running.url)
        await other.customer()
        gw = await other.gateway()
        link = await gw.connect(http, running.url)
        await other.call("PUT", "/admin/v1/customers/contoso/webhook", body={"url": receiver["url"]})
        await link.events(items([cloud_event("created", "x")]))

        async def failing() -> bool:
            doc = (await other.call("GET", "/admin/v1/customers/contoso/webhook"))[1]
            return bool(doc["error"]) and doc["cursor"] == 0

        await eventually(failing, what="the delivery to fail on the certificate")
        assert receiver["requests"] == []
        await link.close()
    finally:
        await running.close()


# -- the command line --------------------------------------------------------------------------------------------
def test_cli_administers_the_data_directory(tmp_path):
    data = str(tmp_path / "hub")
    code, _, err = cli("hub", "token", "contoso", "--data", data)
    assert code == 2 and "no hub database" in err and "gateway hub customer add" in err
    code, out, _ = cli("hub", "customer", "add", "contoso", "--name", "Contoso Ltd", "--data", data)
    assert code == 0 and "gateway hub token contoso" in out
    code, _, err = cli("hub", "customer", "add", "contoso", "--data", data)
    assert code == 2 and "exists already" in err
    code, out, err = cli("hub", "token", "contoso", "--ttl", "30m", "--data", data)
    assert code == 0 and out.strip().startswith("et_") and "gateway enroll" in err
    code, out, _ = cli("hub", "api-key", "contoso", "--data", data)
    assert code == 0 and out.strip().startswith("ck_")
    code, _, err = cli("hub", "api-key", "nobody", "--data", data)
    assert code == 2 and "customer add" in err
    code, out, _ = cli("hub", "gateways", "--data", data)
    assert code == 0 and out.startswith("ID\tCUSTOMER")
    code, _, err = cli("hub", "revoke", "gw_nobody", "--data", data)
    assert code == 2 and "gateway hub gateways" in err
    code, out, _ = cli("hub", "customer", "list", "--data", data)
    assert out.startswith("contoso\tContoso Ltd")


def test_cli_serve_refuses_to_run_without_tls(tmp_path):
    code, _, err = cli("hub", "serve", "--data", str(tmp_path), "--listen", "0.0.0.0:0")
    assert code == 2 and "--cert" in err and "--insecure-http" in err
    code, _, err = cli("hub", "serve", "--data", str(tmp_path), "--listen", "0.0.0.0:0", "--insecure-http")
    assert code == 2 and "loopback" in err
    code, _, err = cli("hub", "serve", "--data", str(tmp_path), "--listen", "127.0.0.1:0", "--insecure-http",
                       "--admin-token-env", "NOT_SET_ANYWHERE")
    assert code == 2 and "NOT_SET_ANYWHERE" in err
    code, _, err = cli("hub", "gateways")
    assert code == 2 and "--data" in err


def test_cli_durations_and_addresses():
    assert hubcli.parse_ttl("90s") == timedelta(seconds=90)
    assert hubcli.parse_ttl("1h") == timedelta(hours=1) == hubcli.parse_ttl("3600")
    assert hubcli.parse_ttl("2d") == timedelta(days=2)
    with pytest.raises(argparse.ArgumentTypeError):
        hubcli.parse_ttl("soon")
    assert hubcli.parse_listen("0.0.0.0:8443") == ("0.0.0.0", 8443)
    assert hubcli.parse_listen("[::1]:9000") == ("::1", 9000)
    assert hubcli.parse_listen(":8443") == ("0.0.0.0", 8443)
    with pytest.raises(argparse.ArgumentTypeError):
        hubcli.parse_listen("8443")
    assert hubcli.parse_days("0") == 0 and hubcli.parse_days("90") == 90
    for bad in ("-1", "1.5", "month"):
        with pytest.raises(argparse.ArgumentTypeError):
            hubcli.parse_days(bad)
    parser = argparse.ArgumentParser(prog="gateway")
    hubcli.register_cli(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["hub", "serve"]).retention_days == 30
    assert parser.parse_args(["hub", "serve", "--retention-days", "0"]).retention_days == 0


# -- metrics -----------------------------------------------------------------------------------------------------
class Clock:
    """The hub's wall clock, moved by the test (stored times, retention, event ages): no sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, url: str, token: str | None = ADMIN) -> tuple[int, Samples]:
    """GET /metrics and parse the exposition text: {(sample name, sorted labels): value}."""
    async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {}) as resp:
        if resp.status != 200:
            return resp.status, {}
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return 200, samples


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_need_the_admin_token_and_show_what_happened(hub_settings, http, receiver):
    clock = Clock()
    running = await start_hub(hub_settings, clock=clock)
    try:
        vendor = Vendor(http, running.url)
        assert (await scrape(http, running.url, token=None))[0] == 401
        assert (await scrape(http, running.url, token="wrong-token-but-long-enough"))[0] == 401
        key = await vendor.customer()
        assert (await scrape(http, running.url, token=key))[0] == 403  # a vendor key is no admin token
        status, m = await scrape(http, running.url)
        assert status == 200
        assert metric(m, "gateway_hub_sessions_connected") == 0
        assert metric(m, "gateway_hub_events_retained", customer="contoso") == 0
        assert metric(m, "gateway_hub_newest_event_age_seconds", customer="contoso") is None  # no event yet
        assert metric(m, "gateway_hub_connects_total", outcome="accepted") == 0

        gw = await vendor.gateway()
        refused = await gw.connect(http, running.url, key=Ed25519PrivateKey.generate())
        assert await refused.closed() == 4401
        await vendor.call("PUT", "/admin/v1/customers/contoso/webhook", body={"url": receiver["url"]})
        link = await gw.connect(http, running.url)
        assert link.welcome["type"] == "welcome"
        evs = [cloud_event("created", f"m{n}", start=T0 + timedelta(hours=n), room_seq=n + 1) for n in range(3)]
        assert (await link.events(items(evs)))["seq"] == 3
        assert (await link.events(items(evs[2:], first_seq=3)))["seq"] == 3  # a redelivery: dropped, acked

        path = "/v1/customers/contoso/commands"
        for answer in ({"key": "cmd-1", "status": "accepted", "booking_id": "b" * 32},
                       {"key": "cmd-2", "status": "declined", "reason": "conflict", "message": "booked"}):
            call = asyncio.create_task(vendor.call("POST", path, token=key, body=create_command(answer["key"])))
            assert (await link.recv())["type"] == "command"
            await link.send("result", result=answer)
            assert (await call)[0] == 200
        assert (await vendor.call("POST", path, token=key, body={"type": "create"}))[0] == 400  # not forwarded

        async def delivered() -> Samples | None:  # the receiver fails the first attempt, then takes all three
            _, m = await scrape(http, running.url)
            return m if metric(m, "gateway_hub_webhook_backlog_events", customer="contoso") == 0 else None

        await eventually(delivered, what="the webhook to deliver the three events")
        clock.advance(seconds=90)
        status, m = await scrape(http, running.url)
        assert status == 200
        assert metric(m, "gateway_hub_sessions_connected") == 1
        assert metric(m, "gateway_hub_connects_total", outcome="accepted") == 1
        assert metric(m, "gateway_hub_connects_total", outcome="unauthorized") == 1
        assert metric(m, "gateway_hub_connects_total", outcome="revoked") == 0
        assert metric(m, "gateway_hub_events_stored_total") == 3
        assert metric(m, "gateway_hub_events_duplicate_total") == 1
        assert metric(m, "gateway_hub_acks_sent_total") == 2
        assert metric(m, "gateway_hub_commands_total", status="accepted", reason="") == 1
        assert metric(m, "gateway_hub_commands_total", status="declined", reason="conflict") == 1
        assert metric(m, "gateway_hub_commands_total", status="failed", reason="invalid_command") == 1
        assert metric(m, "gateway_hub_command_round_trip_seconds_count") == 2
        assert metric(m, "gateway_hub_command_round_trip_seconds_bucket", le="+Inf") == 2
        assert 0 < metric(m, "gateway_hub_command_round_trip_seconds_sum") < 10
        assert metric(m, "gateway_hub_command_timeouts_total") == 0
        assert metric(m, "gateway_hub_webhook_deliveries_total", outcome="delivered") == 3
        assert metric(m, "gateway_hub_webhook_deliveries_total", outcome="failed") == 1
        assert metric(m, "gateway_hub_events_retained", customer="contoso") == 3
        assert metric(m, "gateway_hub_newest_event_age_seconds", customer="contoso") == 90
        assert metric(m, "gateway_hub_events_pruned_total") == 0

        await link.close()

        async def gone() -> bool:
            return metric((await scrape(http, running.url))[1], "gateway_hub_sessions_connected") == 0

        await eventually(gone, what="the session gauge to drop")
    finally:
        await running.close()


async def test_metrics_are_off_without_an_admin_token(hub_settings, http):
    running = await start_hub(replace(hub_settings, admin_token=None))
    try:
        async with http.get(running.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert (resp.status, (await resp.json())["error"]) == (403, "admin_api_disabled")
    finally:
        await running.close()


# -- retention ---------------------------------------------------------------------------------------------------
def test_pruning_goes_in_batches_and_stops_at_the_first_event_to_keep(tmp_path):
    clock = Clock()
    store = HubStore.in_dir(tmp_path, clock=clock)
    try:
        for customer in ("contoso", "fabrikam"):
            store.add_customer(customer)
        store.set_webhook("fabrikam", "https://hooks.example/f")  # before any event: its cursor is 0
        gateways = {c: store.enroll(store.issue_token(c, timedelta(hours=1))[0], bytes([n]) * 32, f"k_{c}", c)
                    for n, c in enumerate(("contoso", "fabrikam"))}

        def put(customer: str, first: int, n: int) -> None:
            store.store_events(gateways[customer].gateway_id, customer, [
                EventItem(seq, seq, cloud_event("created", f"{customer}-{seq}")) for seq in range(first, first + n)])

        put("contoso", 1, 5)
        put("fabrikam", 1, 3)
        store.webhook_delivered("fabrikam", 1)
        clock.advance(days=10)
        put("contoso", 6, 2)
        before = clock() - timedelta(days=5)
        assert [store.prune_events("contoso", before, 2) for _ in range(4)] == [2, 2, 1, 0]
        assert [e.seq for e in store.events_after("contoso", 0)] == [6, 7]  # the recent ones stay
        assert store.prune_events("fabrikam", before, 100) == 1  # only what the webhook has delivered
        assert [e.seq for e in store.events_after("fabrikam", 0)] == [2, 3]
        stats = {s.customer: s for s in store.event_stats()}
        assert (stats["contoso"].events, stats["contoso"].newest_at, stats["contoso"].webhook_backlog) == \
            (2, clock(), None)
        assert (stats["fabrikam"].events, stats["fabrikam"].webhook_backlog) == (2, 2)
        assert all(s.events == store.event_count(c) for c, s in stats.items())
        assert store.prune_events("nobody", before, 10) == 0
    finally:
        store.close()


async def test_retention_prunes_old_events_but_keeps_undelivered_and_recent_ones_and_the_view(
        hub_settings, http, receiver):
    clock = Clock()
    running = await start_hub(replace(hub_settings, retention_days=30), clock=clock)
    try:
        vendor = Vendor(http, running.url)
        contoso = await vendor.customer("contoso")
        fabrikam = await vendor.customer("fabrikam")
        receiver["answers"] = []  # the endpoint takes everything, for now
        await vendor.call("PUT", "/admin/v1/customers/fabrikam/webhook", body={"url": receiver["url"]})
        link_c = await (await vendor.gateway("contoso")).connect(http, running.url)
        link_f = await (await vendor.gateway("fabrikam")).connect(http, running.url)

        old = [cloud_event("created", f"old{n}", start=T0 + timedelta(hours=n), room_seq=n + 1) for n in range(3)]
        assert (await link_c.events(items(old)))["seq"] == 3
        assert (await link_f.events(items([cloud_event("created", f"f{n}") for n in range(2)])))["seq"] == 2

        async def cursor(value: int) -> bool:
            return (await vendor.call("GET", "/admin/v1/customers/fabrikam/webhook"))[1]["cursor"] == value

        await eventually(lambda: cursor(2), what="the webhook to deliver fabrikam's first two events")
        receiver["answers"] = [500] * 100_000  # then the endpoint goes down
        undelivered = cloud_event("created", "f-late")
        assert (await link_f.events(items([undelivered], first_seq=3)))["seq"] == 3
        clock.advance(days=20)
        recent = cloud_event("created", "recent", start=T0 + timedelta(hours=5), room_seq=4)
        assert (await link_c.events(items([recent], first_seq=4)))["seq"] == 4
        clock.advance(days=15)  # the first events are 35 days old, the recent one 15

        with capture_logs() as logs:
            assert await running.hub.prune() == 5
        assert [(e["event"], e["count"]) for e in logs if e["event"] == "hub.pruned"] == [("hub.pruned", 5)]

        async def sse(key: str, customer: str, after: str) -> list[dict[str, str]]:
            async with http.get(running.url + f"/v1/customers/{customer}/events",
                                headers={"Authorization": f"Bearer {key}", "Last-Event-ID": after}) as resp:
                return await read_sse(resp, 1)

        got = await sse(contoso, "contoso", "1")  # resuming from a pruned id: what is left after it
        assert (got[0]["id"], json.loads(got[0]["data"])["id"]) == ("4", recent["id"])
        assert (await sse(contoso, "contoso", "0"))[0]["id"] == "4"
        got = await sse(fabrikam, "fabrikam", "0")  # the undelivered event stays, the delivered ones went
        assert (got[0]["id"], json.loads(got[0]["data"])["id"]) == ("3", undelivered["id"])

        day = f"start={T0:%Y-%m-%dT%H:%M:%SZ}&end={T0 + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
        status, doc = await vendor.call("GET", f"/v1/customers/contoso/rooms/{ROOM}/bookings?{day}", token=contoso)
        assert status == 200 and [b["uid"] for b in doc["bookings"]] == ["old0", "old1", "old2", "recent"]
        assert [r["email"] for r in (await vendor.call("GET", "/v1/customers/contoso/rooms", token=contoso))[1][
            "rooms"]] == [ROOM]

        clock.advance(days=100)  # the recent one ages out too; the undelivered one stays however old
        assert await running.hub.prune() == 1
        _, m = await scrape(http, running.url)
        assert metric(m, "gateway_hub_events_pruned_total") == 6
        assert metric(m, "gateway_hub_events_retained", customer="contoso") == 0
        assert metric(m, "gateway_hub_events_retained", customer="fabrikam") == 1
        assert metric(m, "gateway_hub_webhook_backlog_events", customer="fabrikam") == 1
        assert (await link_c.events(items([cloud_event("created", "after")], first_seq=5)))["seq"] == 5
        assert (await sse(contoso, "contoso", "0"))[0]["id"] == "5"  # the sequence goes on where it was
        await link_c.close()
        await link_f.close()
    finally:
        await running.close()


def test_retention_days_must_be_a_whole_number_of_days(hub_settings):
    hub_settings.validate()
    replace(hub_settings, retention_days=0).validate()  # keep for ever
    for bad in (-1, 1.5):
        with pytest.raises(ConfigError) as e:
            replace(hub_settings, retention_days=bad).validate()
        assert e.value.key == "invalid_hub_setting"
