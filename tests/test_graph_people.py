"""People from Graph (gateway/sources/graph/people.py) through the same people sync as Active Directory's: the
Graph simulator over HTTPS with real msal, a real SQLite store, /users/delta as Microsoft documents it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.sources.graph.auth import TokenSource
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.directory import GraphDirectory
from gateway.sources.graph.settings import GraphSettings
from gateway.store.sqlite import SqliteStore
from gateway.sync.people import PeopleSync
from tests.conftest import GraphSim

pytestmark = pytest.mark.e2e


def graph_settings(g: GraphSim) -> GraphSettings:
    return GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                         authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url, ca_bundle=g.ca_bundle,
                         back_off=0.1)


@pytest.fixture
async def people(graph_sim: GraphSim, tmp_path: Path) -> AsyncIterator[tuple[PeopleSync, SqliteStore]]:
    settings = graph_settings(graph_sim)
    client = GraphClient(settings, TokenSource(settings, graph_sim.client_secret))
    store = SqliteStore(tmp_path / "gateway.sqlite")
    yield PeopleSync(GraphDirectory(client), store, directory="online", drop=("title",)), store
    store.close()
    await client.close()


def events(store: SqliteStore) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.event.type.rsplit(".", 2)[-2], e.event.room, e.event.data) for e in store.outbox_after(0)]


async def test_graph_people_become_person_events_and_rooms_are_not_people(
        graph_sim: GraphSim, people: tuple[PeopleSync, SqliteStore]) -> None:
    sync, store = people
    assert await sync.sync() == {"created": len(graph_sim.org.users) + 2}  # the people and two service accounts
    made = {data["email"]: data for kind, _, data in events(store)}
    assert {u for u, _ in graph_sim.org.users} <= set(made)
    assert not set(graph_sim.graph_rooms) & set(made)  # Entra ID lists the online rooms as users: left out
    alice = made["alice@contoso.com"]
    assert {e[1] for e in events(store)} == {"directory:online"}
    assert alice["directory"] == "online" and alice["enabled"] is True and alice["upn"] == "alice@contoso.com"
    assert alice["name"] == "Alice Anders" and alice["schema_version"] == "1.0"

    control = graph_sim.control
    assert control("PATCH", "/graph/users/alice@contoso.com", {"department": "Finance"})[0] == 200
    assert control("PATCH", "/graph/users/bob@contoso.com", {"accountEnabled": False})[0] == 200
    assert control("PATCH", "/graph/users/dave@contoso.com", {"jobTitle": "Chief"})[0] == 200  # dropped: no event
    assert control("DELETE", "/graph/users/carol@contoso.com", {})[0] == 200
    assert control("POST", "/graph/users", {"mail": "erin@contoso.com", "displayName": "Erin Eck"})[0] == 200
    before = len(events(store))
    assert await sync.sync() == {"created": 1, "updated": 1, "disabled": 1, "removed": 1}
    later = {(kind, data["email"]): data for kind, _, data in events(store)[before:]}
    assert set(later) == {("created", "erin@contoso.com"), ("updated", "alice@contoso.com"),
                          ("disabled", "bob@contoso.com"), ("removed", "carol@contoso.com")}
    assert later[("updated", "alice@contoso.com")]["department"] == "Finance"
    assert later[("disabled", "bob@contoso.com")]["enabled"] is False
    assert await sync.sync() == {}  # nothing changed, nothing told


async def test_an_expired_delta_token_is_a_full_read_never_silence(
        graph_sim: GraphSim, people: tuple[PeopleSync, SqliteStore]) -> None:
    sync, _ = people
    await sync.sync()
    control = graph_sim.control
    assert control("DELETE", "/graph/users/alice@contoso.com", {"permanent": True})[0] == 200
    assert control("POST", "/graph/users", {"mail": "frank@contoso.com", "displayName": "Frank Fox"})[0] == 200
    assert control("POST", "/graph/delta/expire", {"users": True})[1]["expired"] >= 1
    with capture_logs() as logs:
        assert await sync.sync() == {"created": 1, "removed": 1}
    assert any(e["event"] == "graph.people_token_expired" for e in logs)
    assert any(e["event"] == "people.synced" and e["full"] is True for e in logs)
    assert await sync.sync() == {}  # and incremental again from the fresh round's token
