"""Writing through the simulator's Graph side: Exchange's meeting semantics for online rooms, across sides too."""

from __future__ import annotations

from datetime import timedelta

from exchangelib import EWSDateTime

from gateway.simulator.graph.shapes import CLEAN_GOID_PROPERTY
from gateway.sources.ews.mapping import register_properties
from tests.conftest import wait_for
from tests.graph_helpers import event, room_answer, tomorrow, view, z

COMMAND_KEY = "String {00020329-0000-0000-C000-000000000046} Name GatewayCommandKey"


def test_an_online_organiser_books_an_online_room_and_a_retry_books_once(graph_sim):
    organizer, room = graph_sim.graph_users[0], graph_sim.graph_rooms[0]
    start = tomorrow(10)
    body = event("Planning", start, rooms=[room], transactionId="7E163156-7762-4BEB-A1C6-729EA81755A7",
                 singleValueExtendedProperties=[{"id": COMMAND_KEY, "value": "cmd-1"}])
    status, created, _ = graph_sim.request("POST", f"/users/{organizer}/events", body)
    assert status == 201, created
    assert created["transactionId"] == body["transactionId"] and created["isOrganizer"] is True
    status, again, _ = graph_sim.request("POST", f"/users/{organizer}/events", body)
    assert status == 201 and again["id"] == created["id"]  # the retried POST made nothing new
    assert room_answer(graph_sim, organizer, created["id"], room) == "accepted"
    [room_copy] = view(graph_sim, room, start, start + timedelta(minutes=30))
    assert room_copy["responseStatus"]["response"] == "accepted"
    flt = f"singleValueExtendedProperties/Any(ep: ep/id eq '{COMMAND_KEY}' and ep/value eq 'cmd-1')"
    status, found, _ = graph_sim.request("GET", f"/users/{organizer}/events?$filter={flt}")
    assert status == 200 and [e["id"] for e in found["value"]] == [created["id"]]
    status, none, _ = graph_sim.request("GET", f"/users/{organizer}/events?$filter={flt.replace('cmd-1', 'x')}")
    assert status == 200 and none["value"] == []


def test_the_room_declines_a_conflicting_request_on_its_own(graph_sim):
    organizer, room = graph_sim.graph_users[0], graph_sim.graph_rooms[0]
    start = tomorrow(13)
    status, first, _ = graph_sim.request("POST", f"/users/{organizer}/events", event("First", start, rooms=[room]))
    assert room_answer(graph_sim, organizer, first["id"], room) == "accepted"
    status, second, _ = graph_sim.request("POST", f"/users/{organizer}/events",
                                          event("Second", start + timedelta(minutes=15), rooms=[room]))
    assert status == 201
    assert room_answer(graph_sim, organizer, second["id"], room) == "declined"


def test_a_cross_side_organiser_books_an_on_premise_room_with_one_global_object_id(graph_sim):
    """An Exchange Online user books an on-premise room: the request crosses, the on-premise attendant accepts,
    and EWS reads the room's copy with the CleanGlobalObjectId Graph gives the organiser's event."""
    organizer, room = graph_sim.graph_users[0], graph_sim.ews_rooms[0]
    start = tomorrow(15)
    status, created, _ = graph_sim.request("POST", f"/users/{organizer}/events", event("Cross", start, rooms=[room]))
    assert status == 201
    assert room_answer(graph_sim, organizer, created["id"], room) == "accepted"
    expand = f"$expand=singleValueExtendedProperties($filter=id eq '{CLEAN_GOID_PROPERTY}')"
    _, body, _ = graph_sim.request("GET", f"/users/{organizer}/events/{created['id']}?{expand}")
    import base64

    goid = base64.b64decode(body["singleValueExtendedProperties"][0]["value"])
    register_properties()
    [item] = list(graph_sim.room(room).calendar.view(start=EWSDateTime.from_datetime(start),
                                                     end=EWSDateTime.from_datetime(start + timedelta(minutes=30))))
    assert item.clean_global_object_id == goid


def test_decline_as_the_room_needs_the_rooms_own_copy(graph_sim):
    organizer, room = graph_sim.graph_users[0], graph_sim.graph_rooms[0]
    start = tomorrow(16)
    _, created, _ = graph_sim.request("POST", f"/users/{organizer}/events", event("Decline me", start, rooms=[room]))
    assert room_answer(graph_sim, organizer, created["id"], room) == "accepted"
    status, body, _ = graph_sim.request("POST", f"/users/{room}/events/{created['id']}/decline",
                                        {"comment": "Room closed", "sendResponse": True})
    assert status == 404 and body["error"]["code"] == "ErrorItemNotFound"  # the organiser's id, not the room's
    [room_copy] = view(graph_sim, room, start, start + timedelta(minutes=30))
    status, _, _ = graph_sim.request("POST", f"/users/{room}/events/{room_copy['id']}/decline",
                                     {"comment": "Room closed", "sendResponse": True})
    assert status == 202
    assert view(graph_sim, room, start, start + timedelta(minutes=30)) == []
    assert room_answer(graph_sim, organizer, created["id"], room) == "declined"


def test_move_and_cancel_by_the_organiser_reach_the_room(graph_sim):
    organizer, room = graph_sim.graph_users[0], graph_sim.graph_rooms[0]
    start = tomorrow(9)
    _, created, _ = graph_sim.request("POST", f"/users/{organizer}/events", event("Moving", start, rooms=[room]))
    assert room_answer(graph_sim, organizer, created["id"], room) == "accepted"
    later = start + timedelta(hours=2)
    status, moved, _ = graph_sim.request("PATCH", f"/users/{organizer}/events/{created['id']}",
                                         {"start": event("", later)["start"], "end": event("", later)["end"]})
    assert status == 200 and moved["start"]["dateTime"].startswith(later.strftime("%Y-%m-%dT%H:%M"))
    wait_for(lambda: view(graph_sim, room, later, later + timedelta(minutes=30)), what="the room's moved copy")
    status, _, _ = graph_sim.request("POST", f"/users/{room}/events/{created['id']}/cancel", {})
    assert status == 404  # only the organiser's own event can be cancelled
    status, _, _ = graph_sim.request("POST", f"/users/{organizer}/events/{created['id']}/cancel", {"comment": "x"})
    assert status == 202
    wait_for(lambda: view(graph_sim, room, later, later + timedelta(minutes=30)) == [], what="the room's copy gone")


def test_an_appointment_in_the_rooms_own_calendar_and_get_schedule(graph_sim):
    room = graph_sim.graph_rooms[0]
    start = tomorrow(14)
    status, created, _ = graph_sim.request("POST", f"/users/{room}/events", event("Walk-in", start, showAs="busy"))
    assert status == 201 and created["isOrganizer"] is True and created["attendees"] == []
    status, body, _ = graph_sim.request("POST", f"/users/{graph_sim.graph_users[0]}/calendar/getSchedule", {
        "schedules": [room, graph_sim.ews_rooms[0], "nobody@contoso.com"],
        "startTime": {"dateTime": z(start - timedelta(minutes=30))[:-1], "timeZone": "UTC"},
        "endTime": {"dateTime": z(start + timedelta(minutes=60))[:-1], "timeZone": "UTC"},
        "availabilityViewInterval": 30})
    assert status == 200, body
    online, on_premise, unknown = body["value"]
    assert online["availabilityView"] == "020" and online["scheduleItems"][0]["status"] == "busy"
    assert on_premise["availabilityView"] == "000"
    assert unknown["error"]["responseCode"] == "ErrorMailRecipientNotFound"


def test_bad_events_are_refused_with_the_reason(graph_sim):
    organizer = graph_sim.graph_users[0]
    status, body, _ = graph_sim.request("POST", f"/users/{organizer}/events", {"subject": "No time"})
    assert status == 400 and "start and an end" in body["error"]["message"]
    bad = event("Zone", tomorrow(9))
    bad["start"]["timeZone"] = "Mars/Olympus"
    status, body, _ = graph_sim.request("POST", f"/users/{organizer}/events", bad)
    assert status == 400 and body["error"]["code"] == "TimeZoneNotSupportedException"
    status, body, _ = graph_sim.request("POST", f"/users/{organizer}/events", {**event("x", tomorrow(9)),
                                                                               "colour": "red"})
    assert status == 400 and body["error"]["code"] == "RequestBodyRead" and "colour" in body["error"]["message"]
