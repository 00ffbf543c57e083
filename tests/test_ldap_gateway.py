"""The directory in the running gateway and on the command line, against a real Active Directory (Samba): people
reach the local API (GET /v1/people) and its event stream; `gateway directory` shows people, rooms and the bind
account's expiry; the configuration's directory section."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ldap3
import pytest
import yaml

from gateway import cli
from gateway.app import DIRECTORY, STORE, GatewayOptions, init_app, start_gateway, stop_gateway
from gateway.config import load_config
from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.directory_service import DirectoryOptions, DirectoryRunner, ldap_settings, open_directory
from gateway.ports import SourceSpec
from gateway.sharding import Shard
from gateway.sources.memory import MemorySource
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from tests.conftest import eventually
from tests.ldap_server import (
    BASE,
    BIND_DN,
    DOMAIN,
    EXPIRING,
    MAIL,
    NEVER,
    PASSWORD,
    PEOPLE_OU,
    ROOMS_OU,
    SERVER_NAME,
    SERVICE_OU,
    SambaDC,
    group_ldif,
    person_ldif,
    room_ldif,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]


@pytest.fixture
def ou(samba: SambaDC) -> Iterator[str]:
    dn = f"OU=g{uuid.uuid4().hex[:10]},{BASE}"
    samba.add(f"dn: {dn}\nobjectClass: organizationalUnit\n")
    yield dn
    conn = samba.connect()
    try:
        conn.delete(dn, controls=[("1.2.840.113556.1.4.805", True, None)])
    finally:
        conn.unbind()


def config_file(tmp_path: Path, dc: SambaDC, **directory: Any) -> Path:
    doc = {"exchange": {"ews_url": "https://mail.corp.example.test/EWS/Exchange.asmx", "username": "CORP\\svc"},
           "rooms": {"mailboxes": [f"room1@{MAIL}"]},
           "store": {"path": str(tmp_path / "gateway.sqlite")},
           "vault": {"path": str(tmp_path / "credentials.vault"), "key_file": str(tmp_path / "vault.key")},
           "directory": {"urls": [dc.ldaps_url], "bind": f"{DOMAIN}\\svc-ldap", "password_ref": "env:LDAP_PASSWORD",
                         "ca_bundle": str(dc.ca), "server_name": SERVER_NAME, "base_dn": BASE, **directory}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_directory_section_is_read_and_checked(tmp_path: Path, samba: SambaDC) -> None:
    path = config_file(tmp_path, samba, people_group=f"CN=Staff,OU=Groups,{BASE}", drop_fields=["phone"],
                       sync_interval_seconds=60)
    cfg = load_config(path, {"LDAP_PASSWORD": PASSWORD})
    assert cfg.directory is not None
    s = ldap_settings(cfg.directory)
    assert s.urls == (samba.ldaps_url,) and s.people_group == f"CN=Staff,OU=Groups,{BASE}" and s.page_size == 500
    assert cfg.directory.drop_fields == ("phone",) and cfg.directory.sync_interval_seconds == 60
    bad = config_file(tmp_path, samba, urls=["https://dc1"], people_filter="mail=*", drop_fields=["face"])
    with pytest.raises(Exception) as e:
        load_config(bad, {"LDAP_PASSWORD": PASSWORD})
    text = str(e.value)
    assert "directory.urls" in text and "ldaps://" in text
    assert "directory.people_filter" in text and "parentheses" in text
    assert "directory.drop_fields" in text and "'face'" in text


def test_gateway_directory_json_shows_people_rooms_and_the_bind_accounts_expiry(
        tmp_path: Path, samba: SambaDC, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDAP_PASSWORD", PASSWORD)
    path = config_file(tmp_path, samba, people_base=PEOPLE_OU, rooms_base=ROOMS_OU)
    assert cli.main(["directory", "--config", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["email"]: p["state"] for p in doc["people"]} == {
        f"alice@{MAIL}": "enabled", f"bob@{MAIL}": "enabled", f"carol@{MAIL}": "disabled"}
    rooms = {r["email"]: r for r in doc["rooms"]}
    assert sorted(rooms) == [f"room1@{MAIL}", f"room2@{MAIL}", f"room3@{MAIL}"]  # no equipment
    assert (rooms[f"room1@{MAIL}"]["capacity"], rooms[f"room1@{MAIL}"]["location"]) == (8, "HQ, floor 1")
    assert rooms[f"room1@{MAIL}"]["room_lists"] == [f"CN=Rooms HQ,OU=Groups,{BASE}"]
    assert rooms[f"room3@{MAIL}"]["state"] == "not_synced"
    [cred] = doc["credentials"]
    assert cred["credential"] == "directory:directory" and cred["never_expires"] and not cred["locked_out"]

    monkeypatch.setenv("LDAP_PASSWORD", PASSWORD)
    path = config_file(tmp_path, samba, bind=f"{EXPIRING}@{MAIL}")
    assert cli.main(["directory", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "directory:directory" in out and "(in 4 days)" in out and f"{EXPIRING}@{MAIL}" in out


def test_gateway_directory_without_a_directory_says_how_to_add_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"exchange": {"ews_url": "https://mail.example.com/EWS/Exchange.asmx", "username": "CORP\\svc"},
           "rooms": {"mailboxes": ["room1@example.com"]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(doc))
    assert cli.main(["directory", "--config", str(tmp_path / "g.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no directory is configured" in err and "directory:" in err


async def test_people_reach_the_local_api_and_its_event_stream(
        tmp_path: Path, samba: SambaDC, ou: str, aiohttp_client: Any) -> None:
    samba.add(person_ldif("xena", ou, name="Xena Xu", department="Ops"))
    cfg = load_config(config_file(tmp_path, samba, people_base=ou, drop_fields=["department"],
                                  sync_interval_seconds=10), {"LDAP_PASSWORD": PASSWORD})
    assert cfg.directory is not None
    options = GatewayOptions(store_path=tmp_path / "gateway.sqlite",
                             directory=DirectoryOptions("corp", ldap_settings(cfg.directory), PASSWORD,
                                                        drop=("department",), sync_seconds=3600))
    client = await aiohttp_client(init_app(options))
    headers = {"Authorization": f"Bearer {ApiKeys(client.app[STORE]).create('reader', ['read'])}"}

    async def people() -> list[dict[str, Any]]:
        resp = await client.get("/v1/people", headers=headers)
        assert resp.status == 200
        return list((await resp.json())["people"])
    [xena] = await eventually(people, what="the first people sync")
    assert (xena["email"], xena["name"], xena["department"], xena["enabled"]) == (
        f"xena@{MAIL}", "Xena Xu", None, True)

    stream = await client.get("/v1/events", headers=headers, params={"after": "0"})
    assert stream.status == 200
    conn = samba.connect()
    conn.modify(f"CN=Xena Xu,{ou}", {"userAccountControl": [(ldap3.MODIFY_REPLACE, ["514"])]})
    conn.unbind()
    runner = client.app[DIRECTORY]
    assert runner is not None
    runner.sync_now()
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while len(seen) < 2:
            line = (await stream.content.readline()).decode()
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    assert [e["type"] for e in seen] == ["com.exchangegateway.person.created.v1",
                                         "com.exchangegateway.person.disabled.v1"]
    assert {e["partitionkey"] for e in seen} == {"directory:corp"}
    assert seen[1]["data"]["enabled"] is False and seen[1]["subject"] == xena["id"]
    stream.close()
    resp = await client.get("/v1/people", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_without_a_directory_people_are_not_found(tmp_path: Path, aiohttp_client: Any) -> None:
    client = await aiohttp_client(init_app(GatewayOptions(store_path=tmp_path / "g.sqlite")))
    headers = {"Authorization": f"Bearer {ApiKeys(client.app[STORE]).create('reader', ['read'])}"}
    resp = await client.get("/v1/people", headers=headers)
    assert resp.status == 404 and (await resp.json())["error"] == "no_directory"


def test_bind_dn_is_accepted_in_the_configuration(tmp_path: Path, samba: SambaDC) -> None:
    cfg = load_config(config_file(tmp_path, samba, bind=BIND_DN), {"LDAP_PASSWORD": PASSWORD})
    assert cfg.directory is not None and cfg.directory.bind == BIND_DN


async def test_a_room_added_to_a_room_list_in_ad_is_synced_without_a_restart_and_one_removed_leaves(
        tmp_path: Path, samba: SambaDC, ou: str) -> None:
    rooms = [f"r{uuid.uuid4().hex[:6]}{i}" for i in range(3)]
    listed = f"list-{uuid.uuid4().hex[:6]}@{MAIL}"
    samba.add(room_ldif(rooms[0], ou, name="Room A", capacity=4) + room_ldif(rooms[1], ou, name="Room B")
              + room_ldif(rooms[2], ou, name="Room C")
              + group_ldif(f"List {listed}", ou, [f"CN=Room A,{ou}", f"CN=Room B,{ou}"], mail=listed, room_list=True))
    exchange = MemorySource()
    for r in rooms:
        exchange.add_room(f"{r}@{MAIL}", r)
    exchange.add_room(f"fixed@{MAIL}", "Fixed")
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME, people_base=ou, room_list=listed)
    options = GatewayOptions(sources=(SourceSpec("onprem", "memory", exchange, rooms=(f"fixed@{MAIL}",)),),
                             store_path=tmp_path / "gateway.sqlite", feed="poll",
                             directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600,
                                                        rooms_source="onprem"))
    gw = await start_gateway(options)
    try:
        assert gw.rooms == sorted([f"fixed@{MAIL}", f"{rooms[0]}@{MAIL}", f"{rooms[1]}@{MAIL}"])
        await eventually(lambda: all(w.state == "verified" for w in gw.coordinator.workers.values()),
                         what="every room verified")
        assert gw.runner is not None
        runner = gw.runner.app[DIRECTORY]
        assert runner is not None
        conn = samba.connect()
        conn.modify(f"CN=List {listed},{ou}", {"member": [(ldap3.MODIFY_ADD, [f"CN=Room C,{ou}"]),
                                                           (ldap3.MODIFY_DELETE, [f"CN=Room A,{ou}"])]})
        conn.unbind()
        runner.sync_now()
        want = sorted([f"fixed@{MAIL}", f"{rooms[1]}@{MAIL}", f"{rooms[2]}@{MAIL}"])
        await eventually(lambda: gw.rooms == want, what="the room list's change in AD applied")
        assert sorted(gw.coordinator.workers) == want
        assert sorted(gw.sources["onprem"].rooms) == want
        await eventually(lambda: gw.coordinator.workers[f"{rooms[2]}@{MAIL}"].state == "verified",
                         what="the new room synced")
        assert f"{rooms[0]}@{MAIL}" not in {r.email for r in gw.store.rooms()}  # released
    finally:
        await stop_gateway(gw)


async def test_a_wrong_bind_password_costs_one_bind_and_a_new_one_in_the_vault_is_tried_at_once(
        tmp_path: Path, samba: SambaDC, ou: str) -> None:
    samba.add(person_ldif("yuri", ou, name="Yuri Yu"))
    vault = {"password": "wrong"}
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=f"CN={NEVER},{SERVICE_OU}", base_dn=BASE,
                            ca_file=str(samba.ca), server_name=SERVER_NAME, people_base=ou, auth_retry_seconds=3600)
    options = DirectoryOptions("corp", settings, "wrong", sync_seconds=10, reread_secret=lambda: vault["password"])
    directory = open_directory(options)
    store = SqliteStore(tmp_path / "gateway.sqlite")
    runner = DirectoryRunner(options, directory, store, source="urn:test")
    task = asyncio.get_running_loop().create_task(runner.run())
    try:
        await eventually(lambda: runner.failure is not None, what="the refused bind")
        assert runner.failure is not None and runner.failure.key == "invalid_auth"
        for attempt in range(2, 5):  # more syncs: the refusal is repeated without a bind
            runner.sync_now()
            await eventually(lambda n=attempt: runner.failed_syncs >= n, what=f"failed sync {attempt}")
        assert directory.binds == 1
        vault["password"] = PASSWORD  # `gateway credentials set directory`
        runner.sync_now()
        await eventually(lambda: runner.syncs >= 1, what="a sync with the new password", timeout=30)
        # one refused bind, then one bind per connection the pool's threads opened with the new password
        assert runner.failure is None and directory.binds == 1 + len(directory._connections) >= 2
        assert [p.data["email"] for p in store.people("directory:corp").values()] == [f"yuri@{MAIL}"]
        [expiry] = await runner.credential_expiry()
        assert (expiry.credential, expiry.kind, expiry.expires_at, expiry.locked_out) == (
            "directory:corp", "password", None, False)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await directory.close()
        store.close()


async def test_with_two_replicas_each_takes_its_own_rooms_and_only_the_first_relays_people(
        tmp_path: Path, samba: SambaDC, ou: str) -> None:
    names = [f"s{uuid.uuid4().hex[:8]}" for _ in range(6)]
    while len({Shard(0, 2).owns(f"{n}@{MAIL}") for n in names}) < 2:  # rooms for both replicas
        names[0] = f"s{uuid.uuid4().hex[:8]}"
    samba.add(person_ldif("zed", ou, name="Zed Zorn")
              + "".join(room_ldif(n, ou, name=f"Shard Room {i}") for i, n in enumerate(names)))
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME, people_base=ou, rooms_base=ou)
    found: dict[int, list[str]] = {}
    people: dict[int, int] = {}
    for ordinal in (0, 1):
        exchange = MemorySource()
        d = LdapDirectory(settings, PASSWORD)
        try:
            every = sorted(r.email for r in await d.read_rooms())
        finally:
            await d.close()
        for room in every:
            exchange.add_room(room)
        options = GatewayOptions(sources=(SourceSpec("onprem", "memory", exchange),), feed="poll",
                                 store_path=tmp_path / f"replica{ordinal}.sqlite", shard=Shard(ordinal, 2),
                                 directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600,
                                                            rooms_source="onprem"))
        gw = await start_gateway(options)
        try:
            assert gw.runner is not None
            runner = gw.runner.app[DIRECTORY]
            assert runner is not None
            await eventually(lambda r=runner: r.syncs >= 1, what="the directory's first sync")
            found[ordinal] = gw.rooms
            people[ordinal] = len(gw.store.people("directory:corp"))
            assert all(Shard(ordinal, 2).owns(r) for r in gw.rooms)
        finally:
            await stop_gateway(gw)
    assert sorted(found[0] + found[1]) == every and found[0] and found[1]
    assert people == {0: 1, 1: 0}
