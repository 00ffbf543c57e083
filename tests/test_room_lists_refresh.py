"""A source's room lists are read again while the gateway runs (gateway/app.py): a room added to a list is
connected, one removed is disconnected and released, without a restart, for each kind (EWS and Graph; the hybrid
simulator serves both from one directory, whose room lists the control API changes)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import ldap3
import pytest
from structlog.testing import capture_logs

from gateway.app import DIRECTORY, GATEWAY, STORE, GatewayOptions, init_app, start_gateway, stop_gateway
from gateway.directory.ldap import LdapSettings
from gateway.directory_service import DirectoryOptions
from gateway.ports import SourceSpec
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings
from gateway.sources.graph.settings import GraphSettings
from gateway.sources.memory import MemorySource
from gateway.sync.coordinator import SyncSettings
from tests.conftest import GraphSim, eventually
from tests.ldap_server import BASE, BIND_DN, MAIL, PASSWORD, SERVER_NAME, SambaDC, group_ldif, room_ldif

pytestmark = pytest.mark.e2e

LIST = "lobby@contoso.com"


def ews_source(g: GraphSim) -> SourceSpec:
    return SourceSpec("onprem", "ews", EwsSettings(ews_url=g.ews_url, username=f"CONTOSO\\{SERVICE_ACCOUNT}",
                                                   max_workers=4), SERVICE_PASSWORD, room_lists=(LIST,))


def graph_source(g: GraphSim) -> SourceSpec:
    settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                             authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                             ca_bundle=g.ca_bundle, poll_interval_seconds=0.5, back_off=0.1)
    return SourceSpec("online", "graph", settings, g.client_secret, room_lists=(LIST,))


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_a_room_added_to_a_room_list_joins_and_a_room_removed_leaves(
        graph_sim: GraphSim, tmp_path: Path, aiohttp_client: Any, kind: str) -> None:
    g = graph_sim
    first, second = (g.ews_rooms if kind == "ews" else g.graph_rooms)[:2]
    assert g.control("PUT", f"/graph/room-lists/{LIST}", {"rooms": [first]})[0] == 200
    options = GatewayOptions(sources=(ews_source(g) if kind == "ews" else graph_source(g),),
                             sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3),
                             store_path=tmp_path / "gateway.sqlite", feed="poll", room_list_seconds=0.3)
    client = await aiohttp_client(init_app(options))
    gw, store = client.app[GATEWAY], client.app[STORE]
    assert gw.rooms == [first]
    await eventually(lambda: [r.email for r in store.rooms()] == [first], what=f"{first} imported")

    assert g.control("PUT", f"/graph/room-lists/{LIST}", {"rooms": [first, second]})[0] == 200
    await eventually(lambda: gw.rooms == sorted([first, second]) and set(gw.coordinator.workers) == {first, second},
                     what=f"{second} joined")
    await eventually(lambda: sorted(r.email for r in store.rooms()) == sorted([first, second]),
                     what=f"{second} imported")

    assert g.control("PUT", f"/graph/room-lists/{LIST}", {"rooms": [second]})[0] == 200
    await eventually(lambda: gw.rooms == [second] and set(gw.coordinator.workers) == {second}, what=f"{first} left")
    await eventually(lambda: [r.email for r in store.rooms()] == [second], what=f"{first} released")
    assert gw.sources[options.sources[0].name].rooms == [second]


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_a_room_list_that_cannot_be_read_keeps_its_rooms_and_is_said_once(
        graph_sim: GraphSim, tmp_path: Path, aiohttp_client: Any, kind: str) -> None:
    g = graph_sim
    room = (g.ews_rooms if kind == "ews" else g.graph_rooms)[0]
    assert g.control("PUT", f"/graph/room-lists/{LIST}", {"rooms": [room]})[0] == 200
    options = GatewayOptions(sources=(ews_source(g) if kind == "ews" else graph_source(g),),
                             sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3),
                             store_path=tmp_path / "gateway.sqlite", feed="poll", room_list_seconds=0.2)
    with capture_logs() as logs:
        client = await aiohttp_client(init_app(options))
        gw = client.app[GATEWAY]
        directory = gw.sources[options.sources[0].name].opened.directory
        real, reads = directory.rooms, []

        async def counted(room_list: str) -> Any:  # the evidence that the list was read again
            reads.append(room_list)
            return await real(room_list)
        directory.rooms = counted
        assert g.control("DELETE", f"/graph/room-lists/{LIST}")[0] == 200
        await eventually(lambda: sum(e["event"] == "gateway.room_list_failed" for e in logs) >= 1,
                         what="the list's failure said")
        after = len(reads)
        await eventually(lambda: len(reads) >= after + 2, what="the list read again twice")
    failed = [e for e in logs if e["event"] == "gateway.room_list_failed"]
    assert len(failed) == 1 and failed[0]["room_list"] == LIST  # said once, not at every read
    assert gw.rooms == [room] and set(gw.coordinator.workers) == {room}  # nothing accepted is lost


@pytest.mark.xdist_group("ldap")
async def test_a_room_the_directory_drops_stays_while_its_source_s_room_list_holds_it(
        tmp_path: Path, samba: SambaDC) -> None:
    ou = f"OU=g{uuid.uuid4().hex[:10]},{BASE}"
    samba.add(f"dn: {ou}\nobjectClass: organizationalUnit\n")
    both, ad_only = f"r{uuid.uuid4().hex[:6]}a@{MAIL}", f"r{uuid.uuid4().hex[:6]}b@{MAIL}"
    listed = f"list-{uuid.uuid4().hex[:6]}@{MAIL}"
    samba.add(room_ldif(both.split("@")[0], ou, name="Room Both") + room_ldif(ad_only.split("@")[0], ou, name="Room AD")
              + group_ldif(f"List {listed}", ou, [f"CN=Room Both,{ou}", f"CN=Room AD,{ou}"], mail=listed,
                           room_list=True))
    exchange = MemorySource()
    exchange.add_room(both, "Both")
    exchange.add_room(ad_only, "AD only")
    exchange.add_room_list("mine@example.test", [both])
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME, people_base=ou, room_list=listed)
    options = GatewayOptions(sources=(SourceSpec("onprem", "memory", exchange, room_lists=("mine@example.test",)),),
                             store_path=tmp_path / "gateway.sqlite", feed="poll", room_list_seconds=3600,
                             directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600,
                                                        rooms_source="onprem"))
    gw = await start_gateway(options)
    try:
        assert gw.rooms == sorted([both, ad_only])
        assert gw.runner is not None
        runner = gw.runner.app[DIRECTORY]
        assert runner is not None
        await eventually(lambda: runner.syncs >= 1, what="the first directory sync")
        conn = samba.connect()
        conn.modify(f"CN=List {listed},{ou}", {"member": [(ldap3.MODIFY_DELETE, [f"CN=Room Both,{ou}",
                                                                                  f"CN=Room AD,{ou}"])]})
        conn.unbind()
        runner.sync_now()
        await eventually(lambda: gw.rooms == [both], what="the room only AD listed gone")
        assert sorted(gw.coordinator.workers) == [both]  # the source's own room list still holds it
    finally:
        await stop_gateway(gw)
        conn = samba.connect()
        try:
            conn.delete(ou, controls=[("1.2.840.113556.1.4.805", True, None)])
        finally:
            conn.unbind()
