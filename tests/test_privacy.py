"""Privacy from the configuration file to the bytes that leave the building: per-room policies written in
gateway.yaml, meetings made through the simulator's control API, the gateway built by its real factory from that file
(load_config, options_from_config, init_app), and every event read through the local API's event stream (SSE)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.app import GATEWAY, init_app, options_from_config
from gateway.config import load_config
from gateway.model import EVENT_TYPES
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from tests.conftest import ControlClient, SimFixture, eventually

KEEP, HASH, DROP = "room1@contoso.com", "room2@contoso.com", "room3@contoso.com"
SECRET, ORGANIZER = "Layoffs planning", "carol@contoso.com"  # the private meeting's subject and organizer
PLAIN = "Quarterly numbers"
CREATED = EVENT_TYPES["created"]


def write_config(tmp: Path, ews: SimFixture) -> Path:
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"""
exchange:
  ews_url: {ews.url}
  allow_insecure_http: true
  username: 'CONTOSO\\{SERVICE_ACCOUNT}'
  password_ref: env:EWS_PASSWORD
  default_timezone: Europe/Berlin
rooms:
  mailboxes: [{KEEP}, {HASH}, {DROP}]
  privacy:
    subject: keep
    private_subject: Private
    hide_private_organizer: true
    rooms:
      {HASH}:
        subject: hash
      {DROP}:
        subject: drop
sync:
  debounce_seconds: 0.1
store:
  path: {tmp / "data" / "gateway.sqlite"}
vault:
  path: {tmp / "data" / "credentials.vault"}
  key_file: {tmp / "secrets" / "vault.key"}
""")
    return cfg


def slot(days: int, hour: int) -> tuple[str, str]:
    start = (datetime.now(UTC) + timedelta(days=days)).replace(hour=hour, minute=0, second=0, microsecond=0)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ"), (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def read_stream(client: Any, until: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Everything the event stream sends (the raw bytes) until ``until`` booking events have come, and those."""
    raw, events = b"", []
    async with client.get("/v1/events") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(30):
            async for line in resp.content:
                raw += line
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "booking" in event["type"]:
                        events.append(event)
                        if len(events) == until:
                            return raw, events
    raise AssertionError(f"the stream ended after {len(events)} booking events")


async def test_private_meeting_subject_never_leaves(ews: SimFixture, tmp_path: Path, aiohttp_client: Any) -> None:
    control = ControlClient(ews)
    for room in (KEEP, HASH, DROP):  # rooms that keep subjects and the private flag, so the gateway does see them
        status, _ = control("PATCH", f"/rooms/{room}/settings", {"DeleteSubject": False, "AddOrganizerToSubject": False,
                                                                  "RemovePrivateProperty": False})
        assert status == 200
    env = {"EWS_PASSWORD": SERVICE_PASSWORD}
    options = options_from_config(load_config(write_config(tmp_path, ews), env), env)
    store = SqliteStore(options.store_path)  # a key for the consumer, as `gateway api-keys create` makes it
    try:
        key = ApiKeys(store).create("privacy", ["read"])
    finally:
        store.close()
    client = await aiohttp_client(init_app(options), headers={"Authorization": f"Bearer {key}"})
    gateway = client.app[GATEWAY]
    await eventually(lambda: all(w.state == "verified" for w in gateway.coordinator.workers.values()),
                     what="the rooms verified")

    start, end = slot(3, 9)
    status, private = await asyncio.to_thread(control, "POST", "/meetings", {
        "organizer": ORGANIZER, "rooms": [KEEP, HASH], "subject": SECRET, "start": start, "end": end,
        "private": True, "body": f"{SECRET}: the agenda"})
    assert status == 201, private
    start, end = slot(3, 11)
    status, plain = await asyncio.to_thread(control, "POST", "/meetings", {
        "organizer": "alice@contoso.com", "rooms": [KEEP, HASH, DROP], "subject": PLAIN, "start": start, "end": end})
    assert status == 201, plain

    raw, events = await read_stream(client, until=5)  # the private meeting in two rooms, the other one in three
    created = {(e["data"]["room"], e["data"]["uid"]): e["data"] for e in events if e["type"] == CREATED}
    assert len(created) == 5, events

    # The private meeting: its subject, its organizer and anything derived from them never leave, in any room.
    organizer = ews.call(lambda: ews.sim.directory.get(ORGANIZER).person)
    for secret in (SECRET, "Layoffs", hashlib.sha256(SECRET.encode()).hexdigest()[:16], ORGANIZER,
                   organizer.name, "agenda"):
        assert secret.encode() not in raw, secret
    for room in (KEEP, HASH):
        data = created[(room, private["uid"])]
        assert data["sensitivity"] == "private" and data["subject"] == "Private" and data["organizer"] is None
        assert not data["subject_is_organizer_name"]
        assert all(a["email"] != ORGANIZER for a in data["attendees"])

    # The ordinary meeting: each room's policy does what it says.
    assert created[(KEEP, plain["uid"])]["subject"] == PLAIN
    digest = hashlib.sha256(PLAIN.encode()).hexdigest()[:16]
    assert created[(HASH, plain["uid"])]["subject"] == f"sha256:{digest}"  # equal subjects still match
    assert created[(DROP, plain["uid"])]["subject"] is None
    assert raw.count(PLAIN.encode()) == 1  # only the room that keeps subjects sent it
    assert created[(KEEP, plain["uid"])]["organizer"]["email"] == "alice@contoso.com"
