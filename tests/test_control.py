"""The simulator's control endpoint over a real socket, checked through exchangelib against the EWS endpoint."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from exchangelib import EWSDateTime
from requests_ntlm import HttpNtlmAuth

from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from tests.conftest import TZ, ControlClient, SimFixture


@pytest.fixture
def ctl(ews: SimFixture) -> ControlClient:
    return ControlClient(ews)


def _slot(days: int = 7, hour: int = 10, minutes: int = 60) -> tuple[str, str]:
    """A weekday slot ``days`` ahead, as local (Europe/Berlin) ISO text without offset."""
    day = datetime.now(UTC).date() + timedelta(days=days)
    while day.weekday() >= 5:
        day += timedelta(days=1)
    start = datetime(day.year, day.month, day.day, hour, 0)
    return start.isoformat(), (start + timedelta(minutes=minutes)).isoformat()


def _view(account: Any, uid: str) -> list[Any]:
    start = EWSDateTime.now(TZ) - timedelta(days=1)
    items = account.calendar.view(start=start, end=start + timedelta(days=60)).only(
        "uid", "subject", "start", "end", "organizer", "my_response_type", "resources", "is_recurring")
    return [i for i in items if i.uid == uid]


def test_control_refuses_requests_without_the_token(ews: SimFixture) -> None:
    for token in ("", "wrong-token"):
        anonymous = ControlClient(ews, token=token)
        assert anonymous("GET", "/state")[0] == 401
        status, body = anonymous("POST", "/meetings", {"organizer": "alice@contoso.com"})
        assert status == 401 and "token" in body["message"]
        assert anonymous("GET", "/no-such-endpoint")[0] == 401


def test_meeting_with_two_rooms_is_accepted_by_both_and_recorded_by_the_organizer(ews: SimFixture,
                                                                                   ctl: ControlClient) -> None:
    start, end = _slot(days=8, hour=9)
    status, meeting = ctl("POST", "/meetings", {
        "organizer": "alice@contoso.com", "rooms": ["room1@contoso.com", "room2@contoso.com"],
        "attendees": ["bob@contoso.com"], "subject": "Quarterly review", "start": start, "end": end, "wait": True})
    assert status == 201, meeting
    uid = meeting["uid"]
    assert meeting["settled"] is True
    copies = {c["mailbox"]: c for c in meeting["copies"]}
    assert copies["room1@contoso.com"]["response"] == "Accept"
    assert copies["room2@contoso.com"]["response"] == "Accept"

    for room in ("room1@contoso.com", "room2@contoso.com"):
        [copy] = _view(ews.room(room), uid)
        assert copy.my_response_type == "Accept"
        assert copy.subject == "Alice Anders"  # AddOrganizerToSubject + DeleteSubject, the defaults
        assert copy.organizer.email_address == "alice@contoso.com"
    [organizer_copy] = _view(ews.organizer("alice@contoso.com"), uid)
    assert organizer_copy.subject == "Quarterly review"
    answers = {a.mailbox.email_address: a.response_type for a in organizer_copy.resources}
    assert answers == {"room1@contoso.com": "Accept", "room2@contoso.com": "Accept"}

    # The organizer moves it an hour later: both rooms are asked again and accept the new time.
    later, _ = _slot(days=8, hour=11)
    status, moved = ctl("POST", f"/meetings/{uid}/move", {"start": later, "wait": True})
    assert status == 200, moved
    assert {c["mailbox"]: c["start"] for c in moved["copies"]}["room2@contoso.com"] == moved["start"]
    [room_copy] = _view(ews.room("room2@contoso.com"), uid)
    assert room_copy.start.astimezone(TZ).hour == 11

    # Room 2 declines as itself: its copy goes, the organizer's meeting stays with room 2 shown as declined.
    status, answer = ctl("POST", f"/meetings/{uid}/decline", {"as": "room2@contoso.com"})
    assert status == 200 and answer["response"] == "Decline"
    assert _view(ews.room("room2@contoso.com"), uid) == []
    [organizer_copy] = _view(ews.organizer("alice@contoso.com"), uid)
    answers = {a.mailbox.email_address: a.response_type for a in organizer_copy.resources}
    assert answers == {"room1@contoso.com": "Accept", "room2@contoso.com": "Decline"}

    # Cancelled by the organizer: gone from room 1 as well.
    status, _ = ctl("POST", f"/meetings/{uid}/cancel", {"wait": True})
    assert status == 200
    assert _view(ews.room("room1@contoso.com"), uid) == []
    assert ctl("GET", f"/meetings/{uid}")[0] == 404


def test_room_setting_change_makes_the_next_request_decline(ews: SimFixture, ctl: ControlClient) -> None:
    status, settings = ctl("PATCH", "/rooms/room3@contoso.com/settings",
                           {"MaximumDurationInMinutes": 30, "allow_recurring_meetings": False})
    assert status == 200, settings
    assert settings["maximum_duration_in_minutes"] == 30 and settings["allow_recurring_meetings"] is False

    start, end = _slot(days=9, hour=14, minutes=60)
    status, meeting = ctl("POST", "/meetings", {"organizer": "carol@contoso.com", "rooms": ["room3@contoso.com"],
                                                "subject": "Too long", "start": start, "end": end, "wait": True})
    assert status == 201
    copies = {c["mailbox"]: c for c in meeting["copies"]}
    assert copies["room3@contoso.com"]["present"] is False
    [organizer_copy] = _view(ews.organizer("carol@contoso.com"), meeting["uid"])
    assert [a.response_type for a in organizer_copy.resources] == ["Decline"]
    status, decisions = ctl("GET", f"/decisions?uid={meeting['uid']}")
    assert [(d["outcome"], d["reason"]) for d in decisions] == [("declined", "too_long")]

    start, end = _slot(days=10, hour=9, minutes=30)
    status, series = ctl("POST", "/meetings", {"organizer": "carol@contoso.com", "rooms": ["room3@contoso.com"],
                                               "start": start, "end": end, "wait": True,
                                               "recurrence": {"pattern": "weekly", "count": 3}})
    assert status == 201
    status, decisions = ctl("GET", f"/decisions?uid={series['uid']}")
    assert [(d["outcome"], d["reason"]) for d in decisions] == [("declined", "recurring_not_allowed")]


def test_series_occurrences_can_be_modified_and_cancelled(ews: SimFixture, ctl: ControlClient) -> None:
    start, end = _slot(days=7, hour=15, minutes=30)
    status, series = ctl("POST", "/meetings", {
        "organizer": "dave@contoso.com", "rooms": ["room4@contoso.com"], "subject": "Stand-up", "start": start,
        "end": end, "recurrence": {"pattern": "daily", "count": 5}, "private": True, "wait": True})
    assert status == 201, series
    uid = series["uid"]
    assert series["private"] is True and series["recurrence"]["count"] == 5
    day2 = datetime.fromisoformat(series["start"]) + timedelta(days=1)
    status, changed = ctl("POST", f"/meetings/{uid}/move", {"occurrence": 2, "start": (day2 + timedelta(
        hours=1)).isoformat(), "wait": True})
    assert status == 200, changed
    assert len(changed["modified_occurrences"]) == 1
    status, changed = ctl("POST", f"/meetings/{uid}/cancel", {"occurrence": 3, "wait": True})
    assert status == 200 and len(changed["cancelled_occurrences"]) == 1

    room = ews.room("room4@contoso.com")
    lo = EWSDateTime.now(TZ) - timedelta(days=1)
    occurrences = [i for i in room.calendar.view(start=lo, end=lo + timedelta(days=30)).only(
        "uid", "start", "type", "sensitivity") if i.uid == uid]
    assert len(occurrences) == 4
    assert sorted(i.type for i in occurrences) == ["Exception", "Occurrence", "Occurrence", "Occurrence"]
    assert {i.sensitivity for i in occurrences} == {"Normal"}  # RemovePrivateProperty cleared it in the room


def test_external_organizer_is_refused_until_the_room_accepts_external_requests(ews: SimFixture,
                                                                                 ctl: ControlClient) -> None:
    start, end = _slot(days=12, hour=13)
    body = {"organizer": "jordan@fabrikam.example", "rooms": ["room5@contoso.com"], "subject": "Partner visit",
            "start": start, "end": end, "wait": True}
    status, meeting = ctl("POST", "/meetings", {**body, "uid": "partner-visit-1@fabrikam.example"})
    assert status == 201
    assert meeting["uid"] == "partner-visit-1@fabrikam.example" and meeting["organizer"]["external"] is True
    assert ctl("GET", "/decisions?room=room5@contoso.com&limit=1")[1][0]["reason"] == "not_permitted"

    assert ctl("PATCH", "/rooms/room5@contoso.com/settings", {"ProcessExternalMeetingMessages": True})[0] == 200
    assert ctl("POST", "/meetings", {**body, "uid": "partner-visit-2@fabrikam.example"})[0] == 201
    [copy] = _view(ews.room("room5@contoso.com"), "partner-visit-2@fabrikam.example")
    assert copy.organizer.email_address == "jordan@fabrikam.example" and copy.my_response_type == "Accept"


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "words"), [
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["nowhere@contoso.com"],
                           "start": "2030-01-07T10:00", "end": "2030-01-07T11:00"}, 422, "unknown_room",
     "nowhere@contoso.com"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["alice@contoso.com"],
                           "start": "2030-01-07T10:00", "end": "2030-01-07T11:00"}, 422, "not_a_room", "not a room"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["room1@contoso.com"],
                           "start": "2030-01-07T11:00", "end": "2030-01-07T10:00"}, 422, "end_before_start",
     "before start"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["room1@contoso.com"],
                           "start": "next tuesday", "end": "2030-01-07T10:00"}, 400, "bad_request", "ISO 8601"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["room1@contoso.com"],
                           "start": "2030-01-07T10:00"}, 400, "bad_request", "end"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["room1@contoso.com"], "colour": "red",
                           "start": "2030-01-07T10:00", "end": "2030-01-07T11:00"}, 400, "bad_request", "colour"),
    ("POST", "/meetings", {"organizer": "alice@contoso.com", "rooms": ["room1@contoso.com"],
                           "start": "2030-01-07T10:00", "end": "2030-01-07T11:00",
                           "recurrence": {"pattern": "fortnightly"}}, 422, "bad_recurrence", "pattern"),
    ("PATCH", "/rooms/room1@contoso.com/settings", {"AllowDoubleBooking": True}, 422, "unknown_setting",
     "AllowDoubleBooking"),
    ("PATCH", "/rooms/room1@contoso.com/settings", {"BookingWindowInDays": "lots"}, 400, "bad_request", "integer"),
    ("PATCH", "/rooms/room1@contoso.com/settings", {"AutomateProcessing": "Sometimes"}, 422, "bad_setting",
     "AutoAccept"),
    ("PATCH", "/rooms/room99@contoso.com/settings", {"AllowConflicts": True}, 422, "unknown_room", "room99"),
    ("POST", "/meetings/not-a-meeting/move", {"start": "2030-01-07T10:00"}, 404, "unknown_meeting", "not-a-meeting"),
    ("POST", "/faults", {"http_503_rate": 3}, 422, "out_of_range", "fraction"),
    ("POST", "/activity", {"rate": -1}, 422, "out_of_range", "rate"),
    ("GET", "/nothing-here", None, 404, "unknown_endpoint", "known"),
])
def test_bad_input_gets_a_4xx_with_a_message(ctl: ControlClient, method: str, path: str, body: Any, status: int,
                                             code: str, words: str) -> None:
    got, answer = ctl(method, path, body)
    assert (got, answer["error"]) == (status, code), answer
    assert words in answer["message"]


def test_malformed_json_is_a_400(ctl: ControlClient) -> None:
    status, answer = ctl("POST", "/meetings", raw=b"{not json")
    assert status == 400 and answer["error"] == "bad_json"
    status, answer = ctl("POST", "/meetings", raw=b"[1, 2]")
    assert status == 400 and "object" in answer["message"]


def test_faults_restart_and_state(ews: SimFixture, ctl: ControlClient) -> None:
    status, faults = ctl("POST", "/faults", {"http_503_next": 1, "latency": {"GetFolder": 0.01}})
    assert status == 200 and faults == {"latency": {"GetFolder": 0.01}, "http_503_next": 1, "http_503_rate": 0.0}
    req = urllib.request.Request(ews.url, data=b"<x/>", method="POST", headers={"Content-Type": "text/xml"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 503
    assert ctl("DELETE", "/faults")[1]["latency"] == {}
    generation = ctl("GET", "/state")[1]["generation"]
    assert ctl("POST", "/restart")[1] == {"generation": generation + 1}
    ews.room("room1@contoso.com").calendar  # EWS still answers after the restart
    status, state = ctl("GET", "/state")
    assert state["mailboxes"]["rooms"] == 5
    assert state["calls"]["GetFolder"]["NoError"] >= 1
    status, rooms = ctl("GET", "/rooms")
    assert [r["email"] for r in rooms][:2] == ["room1@contoso.com", "room2@contoso.com"]


def test_a_meeting_booked_through_ews_can_be_declined_by_its_room_through_control(ews: SimFixture,
                                                                                   ctl: ControlClient) -> None:
    from exchangelib import CalendarItem
    from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY

    alice = ews.organizer("alice@contoso.com")
    start = EWSDateTime.now(TZ).replace(hour=16, minute=0, second=0, microsecond=0) + timedelta(days=15)
    item = CalendarItem(account=alice, folder=alice.calendar, subject="Booked in Outlook", start=start,
                        end=start + timedelta(minutes=30), resources=["room1@contoso.com"])
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    item.refresh()
    assert ctl("POST", "/attendant/settle", {"timeout": 10})[1]["settled"] is True
    status, meeting = ctl("GET", f"/meetings/{item.uid}")
    assert status == 200 and meeting["organizer"]["email"] == "alice@contoso.com"
    assert meeting["attendees"] == [{"email": "room1@contoso.com", "type": "resource", "response": "Accept"}]

    status, answer = ctl("POST", f"/meetings/{item.uid}/decline", {"as": "room1@contoso.com", "wait": True})
    assert status == 200, answer
    item.refresh()
    assert [a.response_type for a in item.resources] == ["Decline"]


def _logon(ews: SimFixture, password: str, user: str = f"CONTOSO\\{SERVICE_ACCOUNT}") -> requests.Response:
    """One NTLM logon to EWS (a fresh connection each: NTLM authenticates a connection)."""
    with requests.Session() as s:
        return s.post(ews.url, data=b"<x/>", headers={"Content-Type": "text/xml"},
                      auth=HttpNtlmAuth(user, password), timeout=20)


def test_failed_logons_lock_the_account_for_a_while_and_the_control_api_unlocks_it(ews: SimFixture,
                                                                                   ctl: ControlClient) -> None:
    status, policy = ctl("PUT", "/lockout", {"threshold": 3, "window_minutes": 30, "duration_minutes": 30})
    assert status == 200 and policy["policy"] == {"threshold": 3, "window_minutes": 30, "duration_minutes": 30}
    assert _logon(ews, "wrong-1").status_code == 401
    assert _logon(ews, SERVICE_PASSWORD).status_code != 401  # a logon that works resets the count, as AD does
    for n in range(3):
        answer = _logon(ews, f"wrong-{n}")
        assert answer.status_code == 401 and b"locked out" not in answer.content
    account = f"{SERVICE_ACCOUNT}@contoso.com"
    state = ctl("GET", "/lockout")[1]["accounts"][account]
    assert state["locked"] is True and state["bad_password_count"] == 3
    locked = _logon(ews, SERVICE_PASSWORD)  # the right password no longer helps
    assert locked.status_code == 401 and b"The referenced account is currently locked out" in locked.content
    assert ctl("GET", "/lockout")[1]["accounts"][account]["logons_while_locked"] == 1
    assert ews.call(lambda: ews.sim.failed_logons) == 4  # a logon refused for the lock is no bad password

    assert ctl("POST", "/lockout/unlock", {"account": f"CONTOSO\\{SERVICE_ACCOUNT}"}) == (200, {"unlocked": [account]})
    assert _logon(ews, SERVICE_PASSWORD).status_code != 401
    assert ctl("GET", "/lockout")[1]["accounts"][account]["locked"] is False


def test_a_lockout_ends_by_itself_after_its_duration(ews: SimFixture, ctl: ControlClient) -> None:
    ctl("PUT", "/lockout", {"threshold": 1, "window_minutes": 1, "duration_minutes": 0.01})  # 0.6 s
    assert _logon(ews, "wrong").status_code == 401
    assert b"locked out" in _logon(ews, SERVICE_PASSWORD).content
    deadline = time.monotonic() + 20
    while _logon(ews, SERVICE_PASSWORD).status_code == 401:  # polled: each attempt is a request of its own
        assert time.monotonic() < deadline, "the lockout did not end"
        time.sleep(0.2)


@pytest.mark.parametrize("body", [{"threshold": -1}, {"threshold": "3"}, {"window_minutes": 0},
                                  {"duration_minutes": -1}, {"threshold": 3, "colour": "red"}])
def test_a_bad_lockout_policy_is_refused_with_what_is_wrong(ctl: ControlClient, body: dict[str, Any]) -> None:
    status, answer = ctl("PUT", "/lockout", body)
    assert status in (400, 422) and answer["message"], answer  # a malformed field, or one out of range


def test_unlocking_an_unknown_account_says_so(ctl: ControlClient) -> None:
    status, answer = ctl("POST", "/lockout/unlock", {"account": "nobody@contoso.com"})
    assert status == 404 and "nobody@contoso.com" in answer["message"]
