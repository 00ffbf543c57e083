"""The Graph side of the simulator, through msal and HTTPS for real: tokens, reads, and the hybrid organisation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import msal
import pytest
from exchangelib import EWSDateTime

from gateway.simulator.control import Control
from gateway.simulator.graph.shapes import CLEAN_GOID_PROPERTY
from gateway.simulator.graph.tokens import client_certificate
from gateway.sources.ews.mapping import register_properties
from tests.conftest import TZ, GraphSim
from tests.graph_helpers import meeting, settle, tomorrow, view, z

SCOPE = ["https://graph.microsoft.com/.default"]


# -- tokens -----------------------------------------------------------------------------------------------
def test_msal_gets_a_token_with_the_client_secret_and_caches_it(graph_sim):
    app = graph_sim.msal_app()
    first = app.acquire_token_for_client(scopes=SCOPE)
    assert first["token_type"] == "Bearer" and first["expires_in"] > 3000, first
    assert first["token_source"] == "identity_provider"
    again = app.acquire_token_for_client(scopes=SCOPE)
    assert again["token_source"] == "cache" and again["access_token"] == first["access_token"]
    assert graph_sim.call(lambda: graph_sim.sim.graph.tokens.issued) == 1


def test_msal_gets_a_token_with_a_registered_certificate(graph_sim):
    result = graph_sim.msal_app(graph_sim.client_certificate).acquire_token_for_client(scopes=SCOPE)
    assert "access_token" in result, result
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.graph_rooms[0]}", token=result["access_token"])
    assert status == 200 and body["mail"] == graph_sim.graph_rooms[0]


def test_a_certificate_the_app_does_not_know_is_refused_as_entra_does(graph_sim):
    assert graph_sim.client_certificate  # one registered certificate, but not the one signing below
    stranger = client_certificate(graph_sim.client_id)
    result = graph_sim.msal_app(stranger).acquire_token_for_client(scopes=SCOPE)
    assert result["error"] == "invalid_client" and 700027 in result["error_codes"], result


def test_a_forged_signature_with_a_registered_thumbprint_is_refused(graph_sim):
    registered = graph_sim.client_certificate
    forged = dict(client_certificate(graph_sim.client_id), thumbprint=registered["thumbprint"])
    forged.pop("public_certificate")
    result = graph_sim.msal_app(forged).acquire_token_for_client(scopes=SCOPE)
    assert result["error"] == "invalid_client" and "invalid signature" in result["error_description"], result


def test_a_wrong_secret_is_refused_and_an_expired_one_says_so(graph_sim):
    wrong = graph_sim.msal_app("not-the-secret").acquire_token_for_client(scopes=SCOPE)
    assert wrong["error"] == "invalid_client" and 7000215 in wrong["error_codes"]
    status, _ = graph_sim.control("POST", "/graph/credentials", {"secret_expired": True})
    assert status == 200
    expired = graph_sim.msal_app().acquire_token_for_client(scopes=SCOPE)
    assert expired["error"] == "invalid_client" and 7000222 in expired["error_codes"], expired
    assert "AADSTS7000222" in expired["error_description"]


def test_msal_refuses_the_simulator_without_its_ca(graph_sim):
    with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        app = msal.ConfidentialClientApplication(graph_sim.client_id, client_credential=graph_sim.client_secret,
                                                 authority=graph_sim.authority, instance_discovery=False)
        app.acquire_token_for_client(scopes=SCOPE)


def test_graph_wants_a_live_bearer_token(graph_sim):
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.graph_rooms[0]}", token="forged")
    assert status == 401 and body["error"]["code"] == "InvalidAuthenticationToken"
    token = graph_sim.token()
    graph_sim.call(graph_sim.sim.graph.tokens.expire_tokens)
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.graph_rooms[0]}", token=token)
    assert status == 401 and "expired" in body["error"]["message"]


# -- reading ----------------------------------------------------------------------------------------------
def test_calendar_view_shows_a_booking_of_an_online_room_in_graphs_shape(graph_sim):
    room = graph_sim.graph_rooms[0]
    organizer = graph_sim.graph_users[0]
    start = tomorrow(9)
    meeting(graph_sim, organizer, [room], "Design review", start, private=True)
    events = view(graph_sim, room, start - timedelta(hours=1), start + timedelta(hours=2))
    assert len(events) == 1
    ev = events[0]
    assert ev["type"] == "singleInstance" and ev["seriesMasterId"] is None
    assert ev["start"] == {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"}
    assert ev["end"]["dateTime"].startswith((start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M"))
    assert ev["organizer"]["emailAddress"]["address"] == organizer
    assert ev["responseStatus"]["response"] == "accepted"  # the room's attendant accepted it
    assert ev["showAs"] == "busy" and ev["isCancelled"] is False and ev["isAllDay"] is False
    assert ev["sensitivity"] == "normal"  # RemovePrivateProperty, as on premises
    assert [a["type"] for a in ev["attendees"]] == ["resource"]
    assert ev["locations"][0]["locationUri"] == room and ev["locations"][0]["locationType"] == "conferenceRoom"
    organizer_copy = view(graph_sim, organizer, start - timedelta(hours=1), start + timedelta(hours=2))[0]
    assert organizer_copy["id"] != ev["id"]  # ids are per mailbox
    assert organizer_copy["attendees"][0]["status"]["response"] == "accepted"
    assert organizer_copy["sensitivity"] == "private" and organizer_copy["subject"] == "Design review"


def test_calendar_view_pages_by_maxpagesize_and_expands_series(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(8)
    meeting(graph_sim, graph_sim.graph_users[0], [room], "Stand-up", start, minutes=15,
            recurrence={"pattern": "daily", "count": 7})
    seen, url = [], f"/users/{room}/calendarView?startDateTime={z(start)}" \
                   f"&endDateTime={z(start + timedelta(days=10))}"
    pages = 0
    while url:
        status, body, headers = graph_sim.request("GET", url, headers={"Prefer": "odata.maxpagesize=3"})
        assert status == 200, body
        assert headers.get("Preference-Applied") == "odata.maxpagesize=3"
        assert len(body["value"]) <= 3
        seen += body["value"]
        url = body.get("@odata.nextLink")
        pages += 1
    assert pages == 3 and len(seen) == 7
    assert {e["type"] for e in seen} == {"occurrence"}
    assert len({e["seriesMasterId"] for e in seen}) == 1
    assert len({e["iCalUId"] for e in seen}) == 7  # iCalUId differs per occurrence
    assert seen[0]["originalStart"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    status, master, _ = graph_sim.request("GET", f"/users/{room}/events/{seen[0]['seriesMasterId']}")
    assert status == 200 and master["type"] == "seriesMaster"
    assert master["recurrence"]["pattern"]["type"] == "daily"
    assert master["recurrence"]["range"] == {**master["recurrence"]["range"], "type": "numbered",
                                             "numberOfOccurrences": 7}


def test_outlook_timezone_preference_is_honoured(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(9)
    meeting(graph_sim, graph_sim.graph_users[0], [room], "Zoned", start)
    ev = view(graph_sim, room, start - timedelta(hours=1), start + timedelta(hours=1),
              Prefer='outlook.timezone="Pacific Standard Time"')[0]
    local = start.astimezone(TZ.__class__("America/Los_Angeles"))
    assert ev["start"] == {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S.0000000"),
                           "timeZone": "Pacific Standard Time"}


def test_a_meeting_across_sides_carries_one_global_object_id(graph_sim):
    """An on-premise organiser books an on-premise and an online room: each side holds its room's copy, and the
    CleanGlobalObjectId read through Graph is the one EWS gives, so a booking id computed on either side agrees."""
    ews_room, online_room = graph_sim.ews_rooms[0], graph_sim.graph_rooms[0]
    start = tomorrow(11)
    meeting(graph_sim, graph_sim.ews_users[0], [ews_room, online_room], "Hybrid", start)
    ev = view(graph_sim, online_room, start, start + timedelta(minutes=30))[0]
    expand = f"$expand=singleValueExtendedProperties($filter=id eq '{CLEAN_GOID_PROPERTY}')"
    status, body, _ = graph_sim.request("GET", f"/users/{online_room}/events/{ev['id']}?{expand}")
    assert status == 200, body
    [prop] = body["singleValueExtendedProperties"]
    assert prop["id"] == CLEAN_GOID_PROPERTY
    graph_goid = base64.b64decode(prop["value"])
    register_properties()
    account = graph_sim.room(ews_room)
    [item] = list(account.calendar.view(start=EWSDateTime.from_datetime(start - timedelta(minutes=1)),
                                        end=EWSDateTime.from_datetime(start + timedelta(minutes=31))))
    assert item.clean_global_object_id == graph_goid


def test_each_side_refuses_the_other_sides_mailboxes(graph_sim):
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.ews_rooms[0]}/calendarView"
                                               "?startDateTime=2026-01-01T00:00:00Z&endDateTime=2026-01-02T00:00:00Z")
    assert status == 404 and body["error"]["code"] == "MailboxNotEnabledForRESTAPI"
    from exchangelib.errors import ErrorNonExistentMailbox

    with pytest.raises(ErrorNonExistentMailbox):
        list(graph_sim.room(graph_sim.graph_rooms[0]).calendar.all()[:1])


def test_places_lists_online_rooms_and_room_lists(graph_sim):
    status, body, _ = graph_sim.request("GET", "/places/microsoft.graph.room")
    assert status == 200
    rooms = {r["emailAddress"]: r for r in body["value"]}
    assert set(rooms) == set(graph_sim.graph_rooms)
    room = rooms[graph_sim.graph_rooms[0]]
    assert room["capacity"] > 0 and room["building"] in ("HQ", "Annex") and isinstance(room["floorNumber"], int)
    status, lists, _ = graph_sim.request("GET", "/places/microsoft.graph.roomlist")
    assert status == 200 and lists["value"]
    members = set()
    for room_list in lists["value"]:
        status, body, _ = graph_sim.request("GET", f"/places/{room_list['emailAddress']}/microsoft.graph.roomlist"
                                                   "/rooms")
        assert status == 200
        members |= {r["emailAddress"] for r in body["value"]}
    assert members == set(graph_sim.graph_rooms)


def test_errors_come_in_graphs_shape(graph_sim):
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.graph_rooms[0]}/calendarView")
    assert status == 400 and body["error"]["code"] == "ErrorInvalidParameter"
    assert set(body["error"]["innerError"]) >= {"date", "request-id"}
    status, body, _ = graph_sim.request("GET", "/users/nobody@contoso.com/events")
    assert status == 404 and body["error"]["code"] == "ErrorInvalidUser"


# -- delta ------------------------------------------------------------------------------------------------
def delta_round(g: GraphSim, url: str, page: int = 2) -> tuple[list[dict], str]:
    """Follow nextLinks to the deltaLink: (every change, the deltaLink)."""
    changes: list[dict] = []
    while True:
        status, body, _ = g.request("GET", url, headers={"Prefer": f"odata.maxpagesize={page}"})
        assert status == 200, body
        assert len(body["value"]) <= page
        changes += body["value"]
        if "@odata.deltaLink" in body:
            assert "$deltatoken=" in body["@odata.deltaLink"] and "@odata.nextLink" not in body
            return changes, body["@odata.deltaLink"]
        assert "$skiptoken=" in body["@odata.nextLink"]
        url = body["@odata.nextLink"]


def test_delta_lists_the_window_then_only_changes_and_deletions(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(9)
    uids = [meeting(graph_sim, graph_sim.graph_users[0], [room], f"Meeting {n}", start + timedelta(hours=n))
            for n in range(3)]
    url = f"/users/{room}/calendarView/delta?startDateTime={z(start)}&endDateTime={z(start + timedelta(days=1))}"
    first, link = delta_round(graph_sim, url)
    assert len(first) == 3 and all("@removed" not in e for e in first)
    again, link = delta_round(graph_sim, link)
    assert again == []  # nothing changed
    ctl = Control.of(graph_sim.sim)
    graph_sim.call(lambda: ctl.move(uids[0], z(start + timedelta(hours=5)), z(start + timedelta(hours=5, minutes=30))))
    settle(graph_sim)
    graph_sim.call(lambda: ctl.cancel(uids[1]))
    settle(graph_sim)
    changes, link = delta_round(graph_sim, link)
    removed = [e for e in changes if "@removed" in e]
    updated = [e for e in changes if "@removed" not in e]
    assert [e["id"] for e in removed] == [first[1]["id"]]
    assert removed[0] == {"@odata.type": "#microsoft.graph.event", "id": first[1]["id"],
                          "@removed": {"reason": "deleted"}}
    assert [e["start"]["dateTime"][:16] for e in updated] == [(start + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M")]


def test_a_moved_window_needs_a_new_round_and_an_expired_token_answers_410(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(9)
    url = f"/users/{room}/calendarView/delta?startDateTime={z(start)}&endDateTime={z(start + timedelta(hours=2))}"
    _, link = delta_round(graph_sim, url)
    meeting(graph_sim, graph_sim.graph_users[0], [room], "Outside the window", start + timedelta(hours=3))
    changes, link = delta_round(graph_sim, link)
    assert changes == []  # the window is frozen into the token
    status, body = graph_sim.control("POST", "/graph/delta/expire", {"mailbox": room})
    assert status == 200 and body["expired"] >= 1
    status, body, _ = graph_sim.request("GET", link)
    assert status == 410 and body["error"]["code"] == "SyncStateNotFound"
    changes, _ = delta_round(graph_sim, url)  # a fresh round works
    assert changes == []
    graph_sim.control("POST", "/graph/delta/expire", {"code": "resyncRequired"})
    status, body, _ = graph_sim.request("GET", link)
    assert status == 410 and body["error"]["code"] == "resyncRequired"


# -- limits -----------------------------------------------------------------------------------------------
def test_a_fifth_concurrent_request_to_one_mailbox_is_throttled(graph_sim):
    from concurrent.futures import ThreadPoolExecutor

    room = graph_sim.graph_rooms[0]
    token = graph_sim.token()
    assert graph_sim.control("POST", "/graph/throttle", {"latency": 1.0})[0] == 200
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: graph_sim.request("GET", f"/users/{room}/events?$top=1", token=token),
                                range(6)))
    throttled = [(body, headers) for status, body, headers in results if status == 429]
    assert sum(1 for status, _, _ in results if status == 200) <= 4 and throttled
    body, headers = throttled[0]
    assert body["error"]["code"] == "ApplicationThrottled" and "MailboxConcurrency" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1


def test_a_throttling_storm_answers_429_until_it_ends(graph_sim):
    room = graph_sim.graph_rooms[0]
    token = graph_sim.token()
    graph_sim.control("POST", "/graph/throttle", {"seconds": 60, "retry_after": 7})
    status, body, headers = graph_sim.request("GET", f"/users/{room}", token=token)
    assert status == 429 and headers["Retry-After"] == "7" and body["error"]["code"] == "ApplicationThrottled"
    graph_sim.control("POST", "/graph/throttle", {"seconds": 0})
    assert graph_sim.request("GET", f"/users/{room}", token=token)[0] == 200


def test_an_access_policy_denies_rooms_outside_its_group_and_batch_reports_per_request(graph_sim):
    allowed, denied = graph_sim.graph_rooms
    status, _ = graph_sim.control("PUT", "/graph/access-policy", {"mailboxes": [allowed]})
    assert status == 200
    status, body, _ = graph_sim.request("GET", f"/users/{denied}/calendarView"
                                               "?startDateTime=2026-01-01T00:00:00Z&endDateTime=2026-01-02T00:00:00Z")
    assert status == 403 and body["error"]["code"] == "ErrorAccessDenied"
    assert "Blocked by tenant configured AppOnly AccessPolicy settings" in body["error"]["message"]
    status, body, _ = graph_sim.request("POST", "/$batch", {"requests": [
        {"id": "1", "method": "GET", "url": f"/users/{allowed}/events?$top=1"},
        {"id": "2", "method": "GET", "url": f"/users/{denied}/events?$top=1"},
        {"id": "3", "method": "GET", "url": "/places/microsoft.graph.room"}]})
    assert status == 200
    by_id = {r["id"]: r for r in body["responses"]}
    assert by_id["1"]["status"] == 200 and by_id["1"]["body"]["value"] == []
    assert by_id["2"]["status"] == 403 and by_id["2"]["body"]["error"]["code"] == "ErrorAccessDenied"
    assert by_id["3"]["status"] == 200
    status, body, _ = graph_sim.request("POST", "/$batch", {"requests": [
        {"id": str(n), "method": "GET", "url": f"/users/{allowed}"} for n in range(21)]})
    assert status == 400 and "20" in body["error"]["message"]


# -- the `gateway simulator` command ----------------------------------------------------------------------
def test_gateway_simulator_prints_the_graph_side_and_each_rooms_source(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    import requests

    from tests.graph_helpers import first_line

    proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", "3", "--users",
                             "3", "--activity", "0", "--no-bookings", "--graph-rooms", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "GATEWAY_LOG_FORMAT": "json"})
    try:
        ready = json.loads(first_line(proc))
        assert [(r["email"], r["source"]) for r in ready["rooms"]] == [
            ("room1@contoso.com", "ews"), ("room2@contoso.com", "graph"), ("room3@contoso.com", "graph")]
        graph = ready["graph"]
        assert graph["url"].startswith("https://127.0.0.1:") and graph["url"].endswith("/v1.0")
        assert graph["authority"].endswith("/" + graph["tenant_id"])
        assert graph["users"] == ["carol@contoso.com"]  # a third of three
        app = msal.ConfidentialClientApplication(graph["client_id"], client_credential=graph["client_secret"],
                                                 authority=graph["authority"], instance_discovery=False,
                                                 http_client=_verified_session(graph["ca_bundle"]))
        token = app.acquire_token_for_client(scopes=SCOPE)["access_token"]
        resp = requests.get(graph["url"] + "/places/microsoft.graph.room", verify=graph["ca_bundle"], timeout=30,
                            headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200
        assert sorted(r["emailAddress"] for r in resp.json()["value"]) == ["room2@contoso.com", "room3@contoso.com"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not os.path.exists(graph["ca_bundle"])  # its temporary folder goes with it


def _verified_session(ca_bundle: str):
    import requests

    class Verified(requests.Session):
        def request(self, *args, **kwargs):
            kwargs["verify"] = ca_bundle
            return super().request(*args, **kwargs)
    return Verified()


def test_delta_reports_only_the_occurrence_that_changed(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(8)
    uid = meeting(graph_sim, graph_sim.graph_users[0], [room], "Daily", start, minutes=15,
                  recurrence={"pattern": "daily", "count": 5})
    url = f"/users/{room}/calendarView/delta?startDateTime={z(start)}&endDateTime={z(start + timedelta(days=7))}"
    first, link = delta_round(graph_sim, url, page=10)
    assert len(first) == 5
    ctl = Control.of(graph_sim.sim)
    third = start + timedelta(days=2)
    graph_sim.call(lambda: ctl.move(uid, z(third + timedelta(hours=1)), z(third + timedelta(hours=1, minutes=15)),
                                    occurrence=z(third)))
    settle(graph_sim)
    changes, _ = delta_round(graph_sim, link, page=10)
    assert [(e["type"], e["originalStart"]) for e in changes] == [("exception", z(third))]


def test_the_control_api_shortens_token_lifetimes_and_registers_certificates(graph_sim):
    status, _ = graph_sim.control("POST", "/graph/credentials", {"token_lifetime": 60})
    assert status == 200
    app = graph_sim.msal_app()
    first = app.acquire_token_for_client(scopes=SCOPE)
    assert first["expires_in"] <= 60
    again = app.acquire_token_for_client(scopes=SCOPE)  # msal renews what has under five minutes left
    assert again["token_source"] == "identity_provider" and again["access_token"] != first["access_token"]
    cert = client_certificate(graph_sim.client_id)
    status, state = graph_sim.control("POST", "/graph/credentials", {"add_certificate": cert["public_certificate"]})
    assert status == 200 and state["certificates"] == 1
    assert "access_token" in graph_sim.msal_app(cert).acquire_token_for_client(scopes=SCOPE)
    status, body = graph_sim.control("POST", "/graph/credentials", {"add_certificate": "not a pem"})
    assert status == 400 and "PEM" in body["message"]
    status, rooms = graph_sim.control("GET", "/rooms")
    assert {r["email"]: r["source"] for r in rooms} == {**dict.fromkeys(graph_sim.ews_rooms, "ews"),
                                                       **dict.fromkeys(graph_sim.graph_rooms, "graph")}


def test_all_day_events_are_midnight_in_the_requested_zone_and_cancelled_copies_say_so(graph_sim):
    room, organizer, guest = graph_sim.graph_rooms[0], graph_sim.graph_users[0], graph_sim.graph_users[1]
    day = tomorrow(0) + timedelta(days=1)
    ctl = Control.of(graph_sim.sim)
    graph_sim.call(lambda: ctl.create_meeting(organizer=organizer, rooms=[room], subject="Offsite", all_day=True,
                                              start=day.date().isoformat() + "T00:00", tz="Pacific Standard Time",
                                              end=(day + timedelta(days=1)).date().isoformat() + "T00:00"))
    settle(graph_sim)
    for zone_name in ("UTC", "W. Europe Standard Time"):
        [ev] = view(graph_sim, room, day - timedelta(days=1), day + timedelta(days=2),
                    Prefer=f'outlook.timezone="{zone_name}"')
        assert ev["isAllDay"] is True
        assert ev["start"] == {"dateTime": f"{day.date().isoformat()}T00:00:00.0000000", "timeZone": zone_name}
        assert ev["end"]["dateTime"] == f"{(day + timedelta(days=1)).date().isoformat()}T00:00:00.0000000"
    uid = meeting(graph_sim, organizer, [room], "Going away", tomorrow(17), attendees=[guest])
    graph_sim.call(lambda: ctl.cancel(uid))
    settle(graph_sim)
    [copy] = view(graph_sim, guest, tomorrow(17), tomorrow(18))
    assert copy["isCancelled"] is True and copy["subject"].startswith("Canceled: ")
    assert view(graph_sim, room, tomorrow(17), tomorrow(18)) == []


def test_calendar_view_expands_the_global_object_id_and_honours_select(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(9)
    uid = meeting(graph_sim, graph_sim.graph_users[0], [room], "Expanded", start)
    expand = f"$expand=singleValueExtendedProperties($filter=id eq '{CLEAN_GOID_PROPERTY}')"
    status, body, _ = graph_sim.request("GET", f"/users/{room}/calendarView?startDateTime={z(start)}"
                                               f"&endDateTime={z(start + timedelta(hours=1))}&{expand}"
                                               "&$select=subject,start,end")
    assert status == 200, body
    [ev] = body["value"]
    assert set(ev) == {"@odata.etag", "id", "subject", "start", "end", "singleValueExtendedProperties",
                       "singleValueExtendedProperties@odata.context"}
    assert base64.b64decode(ev["singleValueExtendedProperties"][0]["value"]).hex().upper() == uid


def test_the_directory_knows_people_of_both_sides_and_places_by_address(graph_sim):
    status, body, _ = graph_sim.request(
        "GET", "/users?$filter=startswith(displayName,'al') or startswith(mail,'car')&$select=displayName,mail")
    assert status == 200, body
    assert sorted(u["mail"] for u in body["value"]) == ["alice@contoso.com", "carol@contoso.com"]
    assert set(body["value"][0]) == {"id", "displayName", "mail"}
    status, body, _ = graph_sim.request("GET", f"/users/{graph_sim.ews_users[0]}")
    assert status == 200 and body["mail"] == graph_sim.ews_users[0]  # a synchronised on-premise user
    status, body, _ = graph_sim.request("GET", f"/places/{graph_sim.graph_rooms[0]}")
    assert status == 200 and body["@odata.type"] == "#microsoft.graph.room" and body["capacity"]
    status, body, _ = graph_sim.request("GET", f"/places/{graph_sim.ews_rooms[0]}")
    assert status == 404


def test_seeded_activity_acts_on_both_sides(graph_sim):
    from gateway.simulator.activity import Activity

    def run() -> set[str]:
        activity = Activity(Control.of(graph_sim.sim), seed=5)
        touched = set()
        for step in activity.plan(60):
            if activity.execute(step) == "done":
                touched |= set(step.kwargs().get("rooms", ()))
        return touched
    touched = graph_sim.call(run)
    settle(graph_sim)
    assert touched & set(graph_sim.graph_rooms) and touched & set(graph_sim.ews_rooms)
    busy = [r for r in graph_sim.graph_rooms if r in touched]
    now = datetime.now(UTC)
    assert view(graph_sim, busy[0], now - timedelta(days=30), now + timedelta(days=60))


# Microsoft Graph v1.0's event properties (api-reference/v1.0/resources/event.md of microsoft-graph-docs-contrib;
# transactionId, hideAttendees and isDraft joined v1.0 later) and the enumerations it documents.
EVENT_PROPERTIES = {
    "allowNewTimeProposals", "attendees", "body", "bodyPreview", "categories", "changeKey", "createdDateTime", "end",
    "hasAttachments", "hideAttendees", "iCalUId", "id", "importance", "isAllDay", "isCancelled", "isDraft",
    "isOnlineMeeting", "isOrganizer", "isReminderOn", "lastModifiedDateTime", "location", "locations",
    "onlineMeeting", "onlineMeetingProvider", "onlineMeetingUrl", "organizer", "originalEndTimeZone",
    "originalStart", "originalStartTimeZone", "recurrence", "reminderMinutesBeforeStart", "responseRequested",
    "responseStatus", "sensitivity", "seriesMasterId", "showAs", "start", "subject", "transactionId", "type",
    "webLink",
}
ENUMS = {"importance": {"low", "normal", "high"}, "sensitivity": {"normal", "personal", "private", "confidential"},
         "showAs": {"free", "tentative", "busy", "oof", "workingElsewhere", "unknown"},
         "type": {"singleInstance", "occurrence", "exception", "seriesMaster"}}
RESPONSES = {"none", "organizer", "tentativelyAccepted", "accepted", "declined", "notResponded"}


def test_events_hold_graph_v1_properties_and_enumerations_only(graph_sim):
    room, organizer = graph_sim.graph_rooms[0], graph_sim.graph_users[0]
    start = tomorrow(8)
    meeting(graph_sim, organizer, [room], "Series", start, recurrence={"pattern": "daily", "count": 3},
            attendees=[graph_sim.graph_users[1]])
    events = view(graph_sim, organizer, start, start + timedelta(days=3))
    master = graph_sim.request("GET", f"/users/{organizer}/events/{events[0]['seriesMasterId']}")[1]
    for ev in [*events, master]:
        assert set(ev) - {"@odata.etag", "@odata.context"} <= EVENT_PROPERTIES, set(ev) - EVENT_PROPERTIES
        for name, allowed in ENUMS.items():
            assert ev[name] in allowed, (name, ev[name])
        assert ev["responseStatus"]["response"] in RESPONSES
        assert all(a["status"]["response"] in RESPONSES and a["type"] in ("required", "optional", "resource")
                   for a in ev["attendees"])
        assert set(ev["start"]) == {"dateTime", "timeZone"}
