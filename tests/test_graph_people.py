"""People from Graph (gateway/sources/graph/people.py) through the same people sync as Active Directory's: the
Graph simulator over HTTPS with real msal, a real SQLite store, /users/delta as Microsoft documents it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from gateway import cli
from gateway.app import STORE, init_app, options_from_config
from gateway.config import load_config
from gateway.errors import AccessDenied
from gateway.sources.graph.auth import TokenSource
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.directory import GraphDirectory
from gateway.sources.graph.settings import GraphSettings
from gateway.store.sqlite import SqliteStore
from gateway.sync.people import PeopleSync
from tests.conftest import GraphSim, eventually
from tests.running_gateway import api_key

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
    yield PeopleSync(GraphDirectory(client, "online"), store, directory="online", drop=("title",)), store
    store.close()
    await client.close()


def events(store: SqliteStore) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.event.type.rsplit(".", 2)[-2], e.event.room, e.event.data) for e in store.outbox_after(0)]


async def test_graph_people_become_person_events_and_rooms_are_not_people(
        graph_sim: GraphSim, people: tuple[PeopleSync, SqliteStore]) -> None:
    sync, store = people
    control = graph_sim.control
    assert control("PATCH", "/graph/users/bob@contoso.com", {"manager": "alice@contoso.com"})[0] == 200
    assert await sync.sync() == {"created": len(graph_sim.org.users) + 2}  # the people and two service accounts
    made = {data["email"]: data for kind, _, data in events(store)}
    assert {u for u, _ in graph_sim.org.users} <= set(made)
    assert not set(graph_sim.graph_rooms) & set(made)  # Entra ID lists the online rooms as users: left out
    alice = made["alice@contoso.com"]
    assert {e[1] for e in events(store)} == {"directory:online"}
    assert alice["directory"] == "online" and alice["enabled"] is True and alice["upn"] == "alice@contoso.com"
    assert alice["name"] == "Alice Anders" and alice["schema_version"] == "1.0" and alice["manager"] is None
    assert made["bob@contoso.com"]["manager"] == "alice@contoso.com"  # by address, as from AD

    assert control("PATCH", "/graph/users/alice@contoso.com", {"department": "Finance",
                                                               "manager": "dave@contoso.com"})[0] == 200
    assert control("PATCH", "/graph/users/bob@contoso.com", {"accountEnabled": False})[0] == 200
    assert control("PATCH", "/graph/users/dave@contoso.com", {"jobTitle": "Chief"})[0] == 200  # dropped: no event
    assert control("DELETE", "/graph/users/carol@contoso.com", {})[0] == 200
    assert control("POST", "/graph/users", {"mail": "erin@contoso.com", "displayName": "Erin Eck",
                                            "manager": "alice@contoso.com"})[0] == 200
    before = len(events(store))
    assert await sync.sync() == {"created": 1, "updated": 1, "disabled": 1, "removed": 1}
    later = {(kind, data["email"]): data for kind, _, data in events(store)[before:]}
    assert set(later) == {("created", "erin@contoso.com"), ("updated", "alice@contoso.com"),
                          ("disabled", "bob@contoso.com"), ("removed", "carol@contoso.com")}
    assert later[("updated", "alice@contoso.com")]["department"] == "Finance"
    assert later[("updated", "alice@contoso.com")]["manager"] == "dave@contoso.com"  # read whole, manager expanded
    assert later[("created", "erin@contoso.com")]["manager"] == "alice@contoso.com"
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


async def test_without_user_read_all_the_sync_says_which_permission_is_missing(
        graph_sim: GraphSim, people: tuple[PeopleSync, SqliteStore]) -> None:
    sync, store = people
    assert graph_sim.control("POST", "/graph/credentials", {"user_read_all": False})[0] == 200
    with pytest.raises(AccessDenied) as refused:
        await sync.sync()
    assert "User.Read.All" in (refused.value.remedy or "") and "source online" in (refused.value.remedy or "")
    assert store.people_state("directory:online") is None  # nothing read, nothing committed
    assert graph_sim.control("POST", "/graph/credentials", {"user_read_all": True})[0] == 200
    assert (await sync.sync())["created"] > 0


def config_file(tmp_path: Path, g: GraphSim, **people: Any) -> Path:
    doc = {"sources": [{"name": "online", "kind": "graph", "tenant_id": g.tenant_id, "client_id": g.client_id,
                        "authority_host": g.authority.rsplit("/", 1)[0], "graph_url": g.graph_url,
                        "ca_bundle": g.ca_bundle, "client_secret_ref": "env:GRAPH_SECRET",
                        "mailboxes": [g.graph_rooms[0]], "people": people}],
           "store": {"path": str(tmp_path / "gateway.sqlite")}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_a_graph_source_s_people_reach_the_local_api_and_its_event_stream(
        graph_sim: GraphSim, tmp_path: Path, aiohttp_client: Any) -> None:
    env = {"GRAPH_SECRET": graph_sim.client_secret}
    cfg = load_config(config_file(tmp_path, graph_sim, drop_fields=["title"]), env)
    options = options_from_config(cfg, env)
    [p] = options.people_sources
    assert (p.source, p.drop, p.sync_seconds) == ("online", ("title",), 300.0)
    options = replace(options, people_sources=(replace(p, sync_seconds=0.3),))
    client = await aiohttp_client(init_app(options), headers=api_key(options.store_path))

    async def people() -> dict[str, dict[str, Any]]:
        resp = await client.get("/v1/people")
        assert resp.status == 200
        return {d["email"]: d for d in (await resp.json())["people"]}
    found = await eventually(people, what="the first people sync")
    assert {u for u, _ in graph_sim.org.users} <= set(found) and not set(graph_sim.graph_rooms) & set(found)
    assert found["alice@contoso.com"]["directory"] == "online"

    assert graph_sim.control("PATCH", "/graph/users/bob@contoso.com", {"accountEnabled": False})[0] == 200
    disabled = await eventually(lambda: [e for e in client.app[STORE].outbox_after(0)
                                         if e.event.type.endswith("person.disabled.v1")], what="bob disabled")
    assert [(e.event.room, e.event.data["email"]) for e in disabled] == [("directory:online", "bob@contoso.com")]
    assert (await people())["bob@contoso.com"]["enabled"] is False


def test_gateway_directory_json_shows_a_graph_source_s_people(
        graph_sim: GraphSim, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPH_SECRET", graph_sim.client_secret)
    path = config_file(tmp_path, graph_sim)
    assert cli.main(["directory", "--config", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["directories"] == ["online"] and doc["directory"] is None
    people = {p["email"]: p for p in doc["people"]}
    assert {u for u, _ in graph_sim.org.users} <= set(people) and not set(graph_sim.graph_rooms) & set(people)
    assert people["alice@contoso.com"]["directory"] == "online" and people["alice@contoso.com"]["state"] == "enabled"
    assert doc["rooms"] == [] and doc["credentials"] == []
