"""Mapping Graph events to bookings: pure code, checked on a room's calendarView in Microsoft's JSON shape.

tests/data/graph/room-calendarview.json holds the same meetings as tests/data/ews/room-calendar-getitem.xml (a
private meeting, an all-day event created in Pacific time, a weekly series with one moved occurrence), as Graph
returns them with ``Prefer: outlook.timezone="UTC"`` and the CleanGlobalObjectId expanded. Read through either
API, a meeting is the same booking: the same id, the same times and dates.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.sources.ews.mapping import booking_from_xml
from gateway.sources.ews.mapping import uid_from_goid as ews_uid_from_goid
from gateway.sources.graph.mapping import GOID_PROPERTY, booking_from_event, event_uid, parse_time, uid_from_goid

TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
ROOM = "room2@contoso.com"
DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.unit


def events() -> list[dict[str, Any]]:
    return json.loads((DATA / "graph" / "room-calendarview.json").read_text())["value"]


def ews_bookings() -> list[Any]:
    root = etree.fromstring((DATA / "ews" / "room-calendar-getitem.xml").read_bytes())
    return sorted((booking_from_xml(el, ROOM, "Europe/Berlin") for el in root.iter(f"{{{TNS}}}CalendarItem")),
                  key=lambda b: b.start)  # type: ignore[union-attr]


def graph_bookings() -> list[Any]:
    out = []
    for e in events():
        uid = event_uid(e)
        assert uid is not None
        out.append(booking_from_event(e, ROOM, uid))
    assert all(b is not None for b in out)
    return sorted(out, key=lambda b: b.start)


def test_a_meeting_read_through_graph_is_the_same_booking_as_read_through_ews():
    graph, ews = graph_bookings(), ews_bookings()
    assert [b.id for b in graph] == [b.id for b in ews]
    for g, e in zip(graph, ews):
        assert (g.uid, g.meeting_id, g.original_start, g.start, g.end) == (e.uid, e.meeting_id, e.original_start,
                                                                           e.start, e.end)
        assert (g.all_day, g.start_date, g.end_date, g.timezone) == (e.all_day, e.start_date, e.end_date, e.timezone)
        assert (g.series_id, g.is_exception, g.sensitivity, g.response) == (e.series_id, e.is_exception,
                                                                            e.sensitivity, e.response)
        assert g.organizer == e.organizer and g.subject_is_organizer_name == e.subject_is_organizer_name


def test_the_uid_is_read_from_the_clean_global_object_id_as_ews_reads_it():
    external = b"\x04\x00\x00\x00\x82\x00\xe0\x00t\xc5\xb7\x10\x1a\x82\xe0\x08" + b"\x00" * 20 + \
        b"vCal-Uid\x01\x00\x00\x00meeting-from-elsewhere@example.org\x00"
    for goid in (external, bytes(range(40))):
        assert uid_from_goid(goid) == ews_uid_from_goid(goid)
        event = {"singleValueExtendedProperties": [{"id": GOID_PROPERTY.lower(),
                                                    "value": base64.b64encode(goid).decode()}]}
        assert event_uid(event) == ews_uid_from_goid(goid)
    assert uid_from_goid(external) == "meeting-from-elsewhere@example.org"
    assert event_uid({"id": "x"}) is None  # read with a GET of the event, then
    assert event_uid({"singleValueExtendedProperties": [{"id": GOID_PROPERTY, "value": "not base64!"}]}) is None


def test_an_all_day_event_keeps_its_dates_whatever_zone_graph_answered_in():
    all_day = next(b for b in graph_bookings() if b.all_day)
    assert (all_day.start_date, all_day.end_date) == (date(2026, 3, 27), date(2026, 3, 28))
    assert all_day.start == datetime(2026, 3, 27, 7, 0, tzinfo=UTC)  # midnight in Los Angeles, as Exchange keeps it


def test_series_master_cancelled_declined_and_free_are_what_they_say():
    [occurrence] = [e for e in events() if e["type"] == "occurrence"][:1]
    master = {**occurrence, "type": "seriesMaster"}
    assert booking_from_event(master, ROOM, "u") is None
    b = booking_from_event({**occurrence, "isCancelled": True, "showAs": "free",
                            "responseStatus": {"response": "declined"}}, ROOM, "u")
    assert b is not None and b.cancelled and b.free_busy == "free" and b.response == "declined"
    custom = booking_from_event({**occurrence, "originalStartTimeZone": "tzone://Microsoft/Custom"}, ROOM, "u",
                                "Europe/Berlin")
    assert custom is not None and custom.timezone == "Europe/Berlin"
    assert booking_from_event({**occurrence, "start": None}, ROOM, "u") is None


def test_the_instances_of_a_meeting_with_equal_attendees_share_them_and_read_as_they_would_alone():
    """A read keeps one tuple of attendees a meeting (``shared``): instances whose lists are equal get that very tuple
    (its JSON is then made once), an instance whose list differs gets its own, and every booking is the one read
    without sharing, field for field and in its published JSON."""
    series = [e for e in events() if e.get("seriesMasterId")]
    assert len(series) >= 3
    other = json.loads(json.dumps(series[-1]))
    other["attendees"] = [*other["attendees"], {"type": "optional", "status": {"response": "accepted"},
                                                "emailAddress": {"name": "Guest", "address": "Guest@Fabrikam.com"}}]
    renamed = json.loads(json.dumps(series[0]))
    renamed["attendees"][0]["emailAddress"]["name"] = "Someone Else"
    instances = [*series, other, renamed, series[1]]
    uid = "meeting-uid"
    shared: dict[str, Any] = {}
    alone = [booking_from_event(e, ROOM, uid) for e in instances]
    together = [booking_from_event(e, ROOM, uid, shared=shared) for e in instances]
    assert all(b is not None for b in together)
    assert together == alone
    assert [b.content_json() for b in together] == [b.content_json() for b in alone]  # type: ignore[union-attr]
    people = [b.attendees for b in together]  # type: ignore[union-attr]
    assert all(p is people[0] for p in people[:len(series)]), "equal lists share one tuple"
    assert people[len(series)] is not people[0] and people[len(series)][-1].email == "guest@fabrikam.com"
    assert people[len(series) + 1][0].name == "Someone Else" and people[len(series) + 1] is not people[0]
    assert people[-1] == people[0] and people[-1] is not people[0], "the last list read is the one kept"
    another = booking_from_event(series[0], ROOM, "another-meeting", shared=shared)
    assert another is not None and another.attendees is not people[0], "kept by meeting"


def test_graph_times_with_seven_fraction_digits_and_other_zones_parse():
    assert parse_time({"dateTime": "2026-03-26T09:00:00.1234567", "timeZone": "UTC"}) == \
        datetime(2026, 3, 26, 9, 0, 0, 123456, tzinfo=UTC)
    assert parse_time({"dateTime": "2026-03-26T10:00:00.0000000", "timeZone": "W. Europe Standard Time"}) == \
        datetime(2026, 3, 26, 9, 0, tzinfo=UTC)
    assert parse_time("2026-04-02T11:00:00Z") == datetime(2026, 4, 2, 11, 0, tzinfo=UTC)
    assert parse_time(None) is None
