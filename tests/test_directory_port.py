"""The contract of the Directory port (gateway/ports.py), run for the EWS directory against the simulator and for
the in-memory source's directory, both holding the simulator's standard organisation: rooms room1..room5 in two
room lists (HQ: 1, 3, 5; Annex: 2, 4) and the people alice..erin, all surnamed Anders."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.errors import NotFound, Unavailable
from gateway.ports import Directory, RoomInfo, RoomList
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.directory import EwsDirectory
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.memory import MemorySource
from tests.conftest import SimFixture

PEOPLE = ("alice", "bob", "carol", "dave", "erin")


class DirectoryContract:
    async def test_room_lists_are_listed_with_their_names(self, directory: Directory) -> None:
        assert sorted(await directory.room_lists(), key=lambda r: r.email) == [
            RoomList("rooms-annex@contoso.com", "Annex rooms"), RoomList("rooms-hq@contoso.com", "HQ rooms")]

    async def test_a_room_list_gives_its_rooms(self, directory: Directory) -> None:
        hq = await directory.rooms("rooms-hq@contoso.com")
        assert [(r.email, r.name) for r in hq] == [(f"room{i}@contoso.com", f"HQ Room {i}") for i in (1, 3, 5)]
        assert [r.email for r in await directory.rooms("ROOMS-Annex@contoso.com")] == ["room2@contoso.com",
                                                                                      "room4@contoso.com"]

    @pytest.mark.parametrize("address", ["rooms-nowhere@contoso.com", "alice@contoso.com"])
    async def test_what_is_not_a_room_list_is_not_found(self, directory: Directory, address: str) -> None:
        with pytest.raises(NotFound) as e:
            await directory.rooms(address)
        assert e.value.key == "room_list_not_found" and address in str(e.value)

    async def test_a_room_has_details(self, directory: Directory) -> None:
        room = await directory.room("Room3@contoso.com")
        assert (room.email, room.name) == ("room3@contoso.com", "HQ Room 3")
        with pytest.raises(NotFound) as e:
            await directory.room("nobody@contoso.com")
        assert e.value.key == "mailbox_not_found"

    async def test_people_are_found_by_the_start_of_their_name_or_address(self, directory: Directory) -> None:
        assert [(p.email, p.name) for p in await directory.people("alic")] == [("alice@contoso.com", "Alice Anders")]
        found = await directory.people("anders")
        assert sorted(p.email or "" for p in found) == [f"{n}@contoso.com" for n in PEOPLE]
        assert await directory.people("zebra") == []


class TestEwsDirectory(DirectoryContract):
    @pytest.fixture
    async def directory(self, ews: SimFixture) -> AsyncIterator[Directory]:
        source = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", max_workers=2),
                           SERVICE_PASSWORD)
        yield EwsDirectory(source)
        await source.close()


class TestMemoryDirectory(DirectoryContract):
    @pytest.fixture
    def directory(self) -> Directory:
        source = MemorySource()
        lists: dict[str, list[str]] = {}
        for i in range(1, 6):
            building = ("HQ", "Annex")[(i - 1) % 2]
            source.add_room(f"room{i}@contoso.com", f"{building} Room {i}")
            lists.setdefault(building, []).append(f"room{i}@contoso.com")
        for building, rooms in lists.items():
            source.add_room_list(f"rooms-{building.lower()}@contoso.com", rooms, f"{building} rooms")
        for name in PEOPLE:
            source.add_person(f"{name}@contoso.com", f"{name.title()} Anders")
        return source.directory


async def test_the_memory_directory_fails_when_told_to(memory_source: MemorySource) -> None:
    memory_source.add_room_list("all@contoso.com", ["room1@contoso.com", "gone@contoso.com"])
    memory_source.fail(Unavailable("the directory is down"))
    with pytest.raises(Unavailable):
        await memory_source.directory.rooms("all@contoso.com")
    assert await memory_source.directory.rooms("all@contoso.com") == [RoomInfo("room1@contoso.com", "Room 1", 4)]


class TestGraphDirectory(DirectoryContract):
    """Exchange Online's directory through Graph (Places, /users), msal over HTTPS against the simulator with every
    room and person of the organisation online."""

    @pytest.fixture
    async def directory(self, graph_sim_factory) -> AsyncIterator[Directory]:  # type: ignore[no-untyped-def]
        from gateway.sources.graph.auth import TokenSource
        from gateway.sources.graph.client import GraphClient
        from gateway.sources.graph.directory import GraphDirectory
        from gateway.sources.graph.settings import GraphSettings

        g = graph_sim_factory(rooms=5, users=5, graph_rooms=5, graph_users=5)
        settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                                 authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                                 ca_bundle=g.ca_bundle)
        client = GraphClient(settings, TokenSource(settings, g.client_secret))
        yield GraphDirectory(client)
        await client.close()
