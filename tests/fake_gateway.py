"""A minimal gateway written from docs/relay-protocol.md: the gateway's side of protocol v1, as small as it gets
(enroll, handshake, send, receive), and the events and commands it carries. The hub's tests drive the hub with it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.model import EVENT_TYPES, Booking, Event, to_json
from gateway.relay import protocol

ROOM = "room1@contoso.com"
T0 = (datetime.now(UTC) + timedelta(days=2)).replace(hour=9, minute=0, second=0, microsecond=0)


class FakeGateway:
    """The gateway's side of protocol v1, as small as it gets: enroll, handshake, send, receive."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.gateway_id: str | None = None

    @staticmethod
    def public_b64(key: Ed25519PrivateKey) -> str:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return protocol.b64(raw)

    @staticmethod
    def key_id_of(key: Ed25519PrivateKey) -> str:
        return protocol.key_id_for(protocol.unb64(FakeGateway.public_b64(key)))

    @property
    def key_id(self) -> str:
        return self.key_id_of(self.key)

    async def enroll(self, http: aiohttp.ClientSession, url: str, token: str,
                     name: str = "test-gateway") -> tuple[int, dict[str, Any]]:
        public = self.public_b64(self.key)
        body = {"token": token, "public_key": public, "name": name,
                "signature": protocol.b64(self.key.sign(protocol.signed_enrollment(token, public)))}
        async with http.post(url + protocol.ENROLL_PATH, json=body) as resp:
            doc = await resp.json()
            if resp.status == 201:
                self.gateway_id = doc["gateway_id"]
            return resp.status, doc

    async def connect(self, http: aiohttp.ClientSession, url: str, *, key: Ed25519PrivateKey | None = None,
                      last_seq: int = 0, hello: dict[str, Any] | None = None,
                      replica: tuple[int, int] | None = None) -> Link:
        ws = await http.ws_connect(url.replace("https", "wss", 1) + protocol.TUNNEL_PATH,
                                   protocols=(protocol.SUBPROTOCOL,))
        link = Link(ws)
        link.challenge = await link.recv()
        assert link.challenge["type"] == "challenge"
        key = key or self.key
        key_id = self.key_id_of(key)
        assert self.gateway_id is not None
        signature = key.sign(protocol.signed_challenge(link.challenge["nonce"], self.gateway_id, key_id))
        link.hello = hello or {"protocol": protocol.PROTOCOL_VERSION, "gateway_id": self.gateway_id,
                               "key_id": key_id, "signature": protocol.b64(signature), "agent": "fake/1",
                               "last_seq": last_seq}
        if replica is not None and hello is None:
            link.hello["replica"] = {"ordinal": replica[0], "count": replica[1]}
        await link.send("hello", **link.hello)
        link.welcome = await link.recv()
        return link


class Link:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.challenge: dict[str, Any] = {}
        self.hello: dict[str, Any] = {}
        self.welcome: dict[str, Any] = {}
        self.received: list[str] = []  # every text frame, for the schema tests

    async def send(self, msg_type: str, **fields: Any) -> None:
        await self.ws.send_str(protocol.encode(msg_type, **fields))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return {"type": "_closed", "code": self.ws.close_code}
        self.received.append(msg.data)
        return json.loads(msg.data)

    async def closed(self, timeout: float = 10.0) -> int | None:
        """Wait for the hub to close the connection; its close code."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data)  # the code in the hub's close frame
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.received.append(msg.data)

    async def events(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        await self.send("events", events=items)
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()


def cloud_event(kind: str, uid: str, *, room: str = ROOM, start: datetime = T0, minutes: int = 60,
                room_seq: int = 1, **booking: Any) -> dict[str, Any]:
    """A booking (or room) event exactly as the gateway relays it: gateway.model's CloudEvent."""
    if kind == "room_state":
        data = {"room": room, "state": "verified", "reason": "", "remedy": ""}
        ev = Event(id=str(uuid.uuid4()), type=EVENT_TYPES[kind], room=room, subject=room, time=datetime.now(UTC),
                   data=data, sequence=room_seq)
        return ev.to_cloudevent()
    b = Booking(room=room, uid=uid, start=start, end=start + timedelta(minutes=minutes), subject="Standup",
                **booking)
    data = to_json(b)
    if kind == "deleted":
        data["reason"] = "removed_from_exchange"
    ev = Event(id=str(uuid.uuid4()), type=EVENT_TYPES[kind], room=room, subject=b.id, time=datetime.now(UTC),
               data=data, sequence=room_seq)
    return ev.to_cloudevent()


def items(events: list[dict[str, Any]], first_seq: int = 1) -> list[dict[str, Any]]:
    return [{"seq": first_seq + n, "room_seq": first_seq + n, "event": e} for n, e in enumerate(events)]


def create_command(key: str = "cmd-1", **over: Any) -> dict[str, Any]:
    return {"key": key, "type": "create", "room": "Room1@Contoso.com", "start": f"{T0:%Y-%m-%dT%H:%M:%SZ}",
            "end": f"{T0 + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}", "subject": "Planning",
            "booker": {"name": "Kiosk"}, **over}
