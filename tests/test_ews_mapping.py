"""Mapping Exchange calendar items to bookings: pure code, checked on a recorded GetItem response.

tests/data/ews/room-calendar-getitem.xml is what a room's calendar returned: a private meeting (room with
RemovePrivateProperty $false), an all-day event created in Pacific time, and a weekly series across the March
2026 DST change with one moved occurrence.
"""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime
from pathlib import Path

from lxml import etree

from gateway.model import to_json
from gateway.sources.ews import mapping
from gateway.sources.ews.mapping import (
    booking_from_xml,
    bookings_from_xml,
    element_uid,
    gateway_uid,
    made_by_gateway,
    uid_from_goid,
)
from gateway.sync.privacy import PrivacyPolicy, apply

TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
ROOM = "room2@contoso.com"


def bookings():
    root = etree.fromstring((Path(__file__).parent / "data" / "ews" / "room-calendar-getitem.xml").read_bytes())
    out = [booking_from_xml(el, ROOM, "Europe/Berlin") for el in root.iter(f"{{{TNS}}}CalendarItem")]
    assert all(b is not None for b in out)
    return sorted(out, key=lambda b: b.start)  # type: ignore[union-attr]


def test_every_instance_becomes_a_booking_keyed_by_the_meeting_uid():
    bs = bookings()
    assert len(bs) == 6
    assert all(b.room == ROOM and len(b.uid) > 40 for b in bs)
    assert len({b.id for b in bs}) == 6


def test_private_meeting_subject_never_leaves():
    private = next(b for b in bookings() if b.sensitivity == "private")
    assert private.organizer is not None and private.organizer.email == "alice@contoso.com"
    relayed = apply(private, PrivacyPolicy())
    assert relayed.subject == "Private" and relayed.organizer is None
    assert "Alice" not in str(to_json(relayed)["subject"])


def test_room_subject_replaced_by_organizer_name_is_recognised():
    single = bookings()[0]
    assert single.subject == "Alice Anders" and single.subject_is_organizer_name
    assert [a.email for a in single.attendees] == ["room2@contoso.com"]


def test_all_day_event_keeps_its_dates_in_the_creating_zone():
    all_day = next(b for b in bookings() if b.all_day)
    assert all_day.timezone == "America/Los_Angeles"
    assert (all_day.start_date, all_day.end_date) == (date(2026, 3, 27), date(2026, 3, 28))
    assert all_day.start == datetime(2026, 3, 27, 7, 0, tzinfo=UTC)  # midnight in Los Angeles (PDT)
    assert all_day.end == datetime(2026, 3, 28, 7, 0, tzinfo=UTC)


def test_series_instances_carry_original_start_and_exception_flag():
    series = [b for b in bookings() if b.series_id]
    assert len(series) == 4 and len({b.series_id for b in series}) == 1
    moved = [b for b in series if b.is_exception]
    assert len(moved) == 1
    m = moved[0]
    assert m.original_start == datetime(2026, 4, 2, 11, 0, tzinfo=UTC)
    assert m.start == datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
    # Across the DST change the series keeps 13:00 Berlin wall-clock time.
    assert [b.start.hour for b in series if not b.is_exception] == [12, 11, 11]


def test_uid_from_goid_unwraps_external_icalendar_uids():
    goid = bytes.fromhex("040000008200E00074C5B7101A82E008") + b"\x00" * 20 + b"\x1d\x00\x00\x00"
    goid += b"vCal-Uid\x01\x00\x00\x00" + b"abc-123@example.org\x00"
    assert uid_from_goid(goid) == "abc-123@example.org"
    plain = bytes.fromhex("040000008200E00074C5B7101A82E0080000000000000000")
    assert uid_from_goid(plain) == plain.hex().upper()


def test_relayed_bookings_validate_against_the_published_json_schema():
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "gateway" / "schemas" / "booking.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for b in bookings():
        for relayed in (b, apply(b, PrivacyPolicy()), apply(b, PrivacyPolicy(subjects="hash"))):
            validator.validate(to_json(relayed))
    deleted = {**to_json(bookings()[0]), "reason": "room_disconnected"}
    validator.validate(deleted)
    wrong = {**to_json(bookings()[0]), "sensitivity": "secret"}
    assert not validator.is_valid(wrong)


# -- origin: what the gateway wrote is published as the gateway's -----------------------------------------------------
def view_of(name: str, room: str) -> list:
    root = etree.fromstring((Path(__file__).parent / "data" / "ews" / name).read_bytes())
    return [(el, booking_from_xml(el, room, "Europe/Berlin")) for el in root.iter(f"{{{TNS}}}CalendarItem")]


def test_the_gateways_meetings_and_appointments_have_origin_gateway_and_outlooks_exchange():
    """room-calendar-view-origins.xml: room2's CalendarView holding a meeting the gateway made in Alice's calendar
    (the room's copy: no command key, as an extended property of the organizer's item is not carried to it, but the
    UID the gateway set), an appointment it made in the room's calendar (its command key on the item), and Bob's
    meeting from Outlook."""
    found = sorted(view_of("room-calendar-view-origins.xml", "room2@contoso.com"), key=lambda p: p[1].start)
    assert [(b.subject, b.origin) for _, b in found] == [
        ("Alice Anders", "gateway"), ("Lobby display", "gateway"), ("Bob Anders", "exchange")]
    meeting, appointment, outlook = (el for el in (p[0] for p in found))
    assert b"ExchangeGatewayCommandKey" not in etree.tostring(meeting)
    assert b"cmd-panel-7" in etree.tostring(appointment)
    # The command key alone tells (an appointment written before the gateway chose its UIDs) ...
    assert made_by_gateway("D3C0A1E4B2", appointment) and not made_by_gateway("D3C0A1E4B2", outlook)
    # ... and a UID only looks like the gateway's if it is one the gateway makes.
    assert made_by_gateway(gateway_uid()) and gateway_uid() != gateway_uid()
    assert not made_by_gateway("ExchangeGateway-Q3-review@example.org", outlook)


def test_an_empty_field_reads_as_empty_and_a_missing_one_as_absent():
    # The one-pass reading of an item must keep what findtext() gave: stored content hashes depend on it.
    item = etree.fromstring(
        f'<t:CalendarItem xmlns:t="{TNS}"><t:ItemId Id="i1"/><t:Subject/><t:Start>2026-03-02T09:00:00Z</t:Start>'
        '<t:End>2026-03-02T10:00:00Z</t:End><t:UID>uid-empty</t:UID><t:CalendarItemType>Single</t:CalendarItemType>'
        '</t:CalendarItem>')
    b = booking_from_xml(item, ROOM)
    assert b is not None and b.uid == "uid-empty" and b.subject == "" and b.online_meeting_url is None
    assert b.organizer is None and b.attendees == () and b.response == "unknown" and b.free_busy == "busy"


def test_a_views_instances_map_with_each_meetings_details_read_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A room's import maps ~130 instances of ~30 meetings: organizer and attendees were read from the same GetItem
    # answer once per instance. Here the recorded items serve both as the view and as the details.
    root = etree.fromstring((Path(__file__).parent / "data" / "ews" / "room-calendar-getitem.xml").read_bytes())
    items = [(element_uid(el), el) for el in root.iter(f"{{{TNS}}}CalendarItem")]
    details = {uid: el for uid, el in items}  # the last of each meeting: what GetItem of its first item answers
    one_by_one = [booking_from_xml(el, ROOM, "Europe/Berlin", details[uid], uid=uid) for uid, el in items]
    read: list[object] = []
    real = mapping.meeting_from_xml
    monkeypatch.setattr(mapping, "meeting_from_xml", lambda el: read.append(el) or real(el))
    together = bookings_from_xml(items, ROOM, "Europe/Berlin", details)
    assert together == one_by_one and len(together) == 6
    assert [to_json(b) for b in together] == [to_json(b) for b in one_by_one]  # (to the last field and id)
    assert len(read) == len(details) < len(items)
    series = [b for b in together if b.series_id]
    assert len(series) == 4 and all(b.attendees is series[0].attendees for b in series)


def test_each_meetings_id_is_decoded_once_however_many_instances_it_has(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Every instance of a series carries the same CleanGlobalObjectId; an import read (base64 and all) each one.
    root = etree.fromstring((Path(__file__).parent / "data" / "ews" / "room-calendar-getitem.xml").read_bytes())
    els = list(root.iter(f"{{{TNS}}}CalendarItem"))
    expected = [uid_from_goid(base64.b64decode(el.findtext(f"{{{TNS}}}ExtendedProperty/{{{TNS}}}Value") or ""))
                for el in els]
    mapping._uid_of.cache_clear()
    decoded: list[object] = []
    real = base64.b64decode
    monkeypatch.setattr(mapping.base64, "b64decode", lambda v: decoded.append(v) or real(v))
    assert [element_uid(el) for el in els] == expected
    assert [element_uid(el) for el in els] == expected  # (a second read of the page decodes nothing)
    assert len(decoded) == len(set(expected)) == 3 < len(els) == 6


def test_a_command_key_and_the_meeting_id_are_read_wherever_the_property_puts_its_parts() -> None:
    # ExtendedFieldURI then Value is the schema's order; read by tag, not by position, either way.
    goid = base64.b64encode(b"\x04\x00\x00\x00" + b"vCal-Uid\x01\x00\x00\x00" + b"uid-1\x00").decode()
    item = etree.fromstring(
        f'<t:CalendarItem xmlns:t="{TNS}"><t:ItemId Id="i1"/><t:Start>2026-03-02T09:00:00Z</t:Start>'
        '<t:End>2026-03-02T10:00:00Z</t:End><t:CalendarItemType>Single</t:CalendarItemType>'
        f'<t:ExtendedProperty><t:Value>{goid}</t:Value><t:ExtendedFieldURI DistinguishedPropertySetId="Meeting" '
        'PropertyId="35" PropertyType="Binary"/></t:ExtendedProperty>'
        '<t:ExtendedProperty><t:Value>cmd-9</t:Value><t:ExtendedFieldURI DistinguishedPropertySetId="PublicStrings" '
        f'PropertyName="{mapping.COMMAND_KEY_PROPERTY}" PropertyType="String"/></t:ExtendedProperty>'
        '</t:CalendarItem>')
    b = booking_from_xml(item, ROOM)
    assert b is not None and b.uid == "uid-1" and b.origin == "gateway"
