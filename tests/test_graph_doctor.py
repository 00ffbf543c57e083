"""`gateway doctor` for a Graph source, by doing it against the simulator's Graph side over HTTPS: the token (one
line for every room when it is refused), each room readable (an access policy named with its PowerShell), a delta,
and a subscription through the hub (Graph validates the hub's URLs: the notification path)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app import GatewayOptions
from gateway.config import CommandsConfig
from gateway.doctor import Report, check_sources
from gateway.ports import SourceSpec
from gateway.simulator.server import SimulatorConfig
from gateway.sources.graph.settings import GraphSettings
from tests.conftest import GraphSim, free_port
from tests.graph_hub import Inbox, stand_in_hub

pytestmark = pytest.mark.e2e

ROOM3, ROOM4 = "room3@contoso.com", "room4@contoso.com"


@pytest.fixture
async def hub(pki: Any) -> AsyncIterator[Inbox]:
    async for inbox in stand_in_hub(pki):
        yield inbox


@pytest.fixture
def g(graph_sim_factory: Any, pki: Any) -> GraphSim:
    sim: GraphSim = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    status, _ = sim.control("PATCH", "/graph/subscriptions", {"notify_ca_bundle": str(pki.ca_file)})
    assert status == 200
    return sim


async def doctor(g: GraphSim, inbox: Inbox | None, capsys: Any) -> tuple[Report, list[str]]:
    settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                             authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                             ca_bundle=g.ca_bundle, outage_retry_seconds=60)
    options = GatewayOptions(sources=(SourceSpec("online", "graph", settings, g.client_secret, rooms=(ROOM3, ROOM4),
                                                 inbox=inbox),), commands=CommandsConfig())
    report = Report(None)
    await check_sources(options, report)
    return report, capsys.readouterr().out.splitlines()


async def test_a_healthy_graph_source_is_all_green_through_the_hub(g: GraphSim, hub: Inbox, capsys: Any) -> None:
    report, lines = await doctor(g, hub, capsys)
    assert not report.failed, lines
    assert any(line.startswith("ok") and "source online (graph)" in line for line in lines)
    assert [line.split()[2] for line in lines if line.startswith("ok") and " room " in line] == [ROOM3, ROOM4]
    _, state = g.control("GET", "/graph/subscriptions")
    assert state["validations"] >= 4 and state["subscriptions"] == []  # made through the hub, then removed


async def test_a_hub_graph_cannot_reach_fails_the_subscription_check(g: GraphSim, capsys: Any) -> None:
    nowhere = Inbox(f"https://127.0.0.1:{free_port()}")
    report, lines = await doctor(g, nowhere, capsys)
    assert report.failed
    [failed] = [line for line in lines if line.startswith("FAIL")]
    assert "subscription through the hub" in failed and "rooms (all 2)" in failed


async def test_a_room_the_access_policy_leaves_out_is_named_with_its_remedy(g: GraphSim, capsys: Any) -> None:
    status, _ = g.control("PUT", "/graph/access-policy", {"mailboxes": [ROOM3]})
    assert status == 200
    report, lines = await doctor(g, None, capsys)
    assert report.failed
    [failed] = [line for line in lines if line.startswith("FAIL")]
    assert ROOM4 in failed and "impersonation_denied" in failed and "New-ApplicationAccessPolicy" in failed
    assert any(line.startswith("ok") and ROOM3 in line for line in lines)
    assert any(line.startswith("skip") and "no relay" in line for line in lines)


async def test_an_expired_secret_is_one_line_and_no_room_is_tried(g: GraphSim, capsys: Any) -> None:
    status, _ = g.control("POST", "/graph/credentials", {"secret_expired": True})
    assert status == 200
    report, lines = await doctor(g, None, capsys)
    failed = [line for line in lines if line.startswith("FAIL")]
    assert report.failed
    assert len(failed) == 1 and "auth_required" in failed[0] and "expired" in failed[0]
    assert g.client_secret not in "\n".join(lines)
    assert any(line.startswith("skip") for line in lines)
    _, state = g.control("GET", "/graph")
    assert state["tokens_issued"] == 0 and not any(k.startswith("GET /users") for k in state["calls"])
