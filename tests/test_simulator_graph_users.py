"""Entra ID's users in the Graph simulator (gateway/simulator/graph/users.py), over HTTPS with msal's tokens:
/users paged and selected, rooms among the users as in Entra ID, and /users/delta as Microsoft documents it."""

from __future__ import annotations

from typing import Any

from tests.conftest import GraphSim


def _round(graph_sim: GraphSim, link: str, page: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Every page of a delta round: (the values, the deltaLink)."""
    values: list[dict[str, Any]] = []
    headers = {"Prefer": f"odata.maxpagesize={page}"} if page else None
    pages = 0
    while True:
        status, body, _ = graph_sim.request("GET", link, headers=headers)
        assert status == 200, body
        pages += 1
        values += body["value"]
        if "@odata.deltaLink" in body:
            assert "@odata.nextLink" not in body
            return values, body["@odata.deltaLink"]
        link = body["@odata.nextLink"]
        assert "$skiptoken=" in link


def test_users_are_paged_and_selected_and_online_rooms_are_users_too(graph_sim):
    status, body, _ = graph_sim.request("GET", "/users?$select=mail,accountEnabled,department&$top=3")
    assert status == 200, body
    assert len(body["value"]) == 3 and set(body["value"][0]) == {"id", "mail", "accountEnabled", "department"}
    seen = [u["mail"] for u in body["value"]]
    link = body["@odata.nextLink"]
    while link:
        status, body, _ = graph_sim.request("GET", link)
        assert status == 200, body
        seen += [u["mail"] for u in body["value"]]
        link = body.get("@odata.nextLink")
    people = [u for u, _ in graph_sim.org.users]
    assert set(people) <= set(seen) and len(seen) == len(set(seen))
    # resource accounts are users in Entra ID: the online rooms are listed (disabled), the on-premise ones are not
    assert set(graph_sim.graph_rooms) <= set(seen) and not set(graph_sim.ews_rooms) & set(seen)
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.graph_rooms[0]}?$select=accountEnabled")
    assert status == 200 and body == {"@odata.context": body["@odata.context"], "id": body["id"],
                                      "accountEnabled": False}


def test_user_delta_lists_everyone_then_only_what_changed(graph_sim):
    control = graph_sim.control
    first, delta_link = _round(graph_sim, "/users/delta?$select=displayName,mail,accountEnabled,department,manager",
                               page=2)
    by_mail = {u["mail"]: u for u in first}
    assert set(by_mail["alice@contoso.com"]) == {"id", "displayName", "mail", "accountEnabled", "department",
                                                 "manager@delta"}
    assert by_mail["alice@contoso.com"]["accountEnabled"] is True
    alice, bob = by_mail["alice@contoso.com"]["id"], by_mail["bob@contoso.com"]["id"]
    assert "$deltatoken=" in delta_link and "$select" not in delta_link  # the token carries the $select

    again, delta_link = _round(graph_sim, delta_link)
    assert again == []  # nothing changed

    assert control("POST", "/graph/users", {"mail": "erin@contoso.com", "displayName": "Erin Eck",
                                            "department": "Sales"})[0] == 200
    assert control("PATCH", "/graph/users/alice@contoso.com", {"department": "Finance",
                                                               "manager": "bob@contoso.com"})[0] == 200
    assert control("PATCH", f"/graph/users/{bob}", {"accountEnabled": False})[0] == 200
    assert control("DELETE", "/graph/users/carol@contoso.com", {})[0] == 200
    assert control("DELETE", "/graph/users/dave@contoso.com", {"permanent": True})[0] == 200
    changes, delta_link = _round(graph_sim, delta_link)
    by_id = {u["id"]: u for u in changes}
    assert by_id[alice] == {"id": alice, "department": "Finance",  # only what changed
                            "manager@delta": [{"@odata.type": "#microsoft.graph.user", "id": bob}]}
    assert by_id[bob] == {"id": bob, "accountEnabled": False}
    [erin] = [u for u in changes if u.get("mail") == "erin@contoso.com"]
    assert erin["displayName"] == "Erin Eck" and erin["department"] == "Sales" and erin["accountEnabled"] is True
    status, body, _ = graph_sim.request("GET", "/users/alice@contoso.com?$select=mail&$expand=manager($select=id)")
    assert status == 200 and body["manager"]["id"] == bob  # the manager is a relationship: expanded
    removed = {u["@removed"]["reason"] for u in changes if "@removed" in u}
    assert removed == {"changed", "deleted"}  # soft and permanent deletes
    assert graph_sim.request("GET", "/users/carol@contoso.com")[0] == 404

    assert control("POST", "/graph/delta/expire", {"users": True})[1]["expired"] >= 1
    status, body, _ = graph_sim.request("GET", delta_link)
    assert status == 410 and body["error"]["code"] == "SyncStateNotFound"


def test_a_room_list_s_rooms_change_for_both_sides(graph_sim):
    status, body, _ = graph_sim.request("GET", "/places/microsoft.graph.roomlist")
    assert status == 200, body
    address = body["value"][0]["emailAddress"]
    status, body = graph_sim.control("PUT", f"/graph/room-lists/{address}", {"rooms": graph_sim.graph_rooms})
    assert status == 200, body
    status, body, _ = graph_sim.request("GET", f"/places/{address}/microsoft.graph.roomlist/rooms")
    assert sorted(r["emailAddress"] for r in body["value"]) == sorted(graph_sim.graph_rooms)
    assert graph_sim.control("PUT", f"/graph/room-lists/{address}", {"rooms": ["alice@contoso.com"]})[0] == 400
