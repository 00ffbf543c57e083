"""The simulator's write side, driven by exchangelib over HTTP + NTLM the way the gateway's booking commands drive
Exchange: extended properties (the command key), meeting responses in the organizer's Inbox, declining as the room,
and the three write paths of the semantics doc (organizer meeting, room appointment, availability).

Every request and response is validated against the EWS schema by the simulator itself (validate_responses is on).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from exchangelib import UTC, Account, CalendarItem, EWSDateTime, ExtendedProperty
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY, MeetingResponse
from exchangelib.recurrence import DailyPattern, Recurrence
from exchangelib.restriction import Q
from lxml import etree

from gateway.simulator import ids
from gateway.simulator.control import setting_name
from gateway.simulator.messages import DECLINE_REASON_TEXT, RESPONSE_TEXT
from gateway.simulator.schema import MNS, TNS, validate
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from tests.conftest import TZ, wait_for

ROOM = "room1@contoso.com"
ROOM2 = "room2@contoso.com"
ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
WAIT = 10.0  # seconds: a bound for polling, never a sleep


class CommandKey(ExtendedProperty):
    """The gateway's idempotency key on items it writes (as gateway/sources/ews/writer.py defines it)."""

    distinguished_property_set_id = "PublicStrings"
    property_name = "ExchangeGatewayCommandKey"
    property_type = "String"


class CleanGlobalObjectId(ExtendedProperty):
    distinguished_property_set_id = "Meeting"
    property_id = 0x23
    property_type = "Binary"


class Attempts(ExtendedProperty):
    """An integer property (PublicStrings by GUID), to check typed values and comparisons."""

    property_set_id = "00020329-0000-0000-C000-000000000046"
    property_name = "ExchangeGatewayAttempts"
    property_type = "Integer"


@pytest.fixture
def props() -> Iterator[None]:
    """Register the properties for this test (leaving alone any the gateway's own modules registered already)."""
    wanted = [(CalendarItem, "gateway_command_key", CommandKey), (CalendarItem, "gateway_attempts", Attempts),
              (CalendarItem, "clean_global_object_id", CleanGlobalObjectId),
              (MeetingResponse, "clean_global_object_id", CleanGlobalObjectId)]
    mine = [(cls, name) for cls, name, prop in wanted if name not in {f.name for f in cls.FIELDS}]
    for cls, name, prop in wanted:
        if (cls, name) in mine:
            cls.register(name, prop)
    try:
        yield
    finally:
        for cls, name in mine:
            cls.deregister(name)


# -- helpers -------------------------------------------------------------------------------------------
def day_at(days: int, hour: int, minute: int = 0) -> EWSDateTime:
    base = EWSDateTime.now(TZ) + dt.timedelta(days=days)
    return base.replace(hour=hour, minute=minute, second=0, microsecond=0)


def book(account: Account, subject: str, start: EWSDateTime, end: EWSDateTime, *, rooms: tuple[str, ...] = (ROOM,),
         **fields: Any) -> CalendarItem:
    item = CalendarItem(account=account, folder=account.calendar, subject=subject, start=start, end=end,
                        resources=list(rooms), **fields)
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    return item


def room_answer(item: CalendarItem, room: str = ROOM) -> str | None:
    item.refresh()
    for att in item.resources or []:
        if att.mailbox.email_address == room:
            return att.response_type
    return None


def decided(item: CalendarItem, room: str = ROOM) -> str:
    """Wait until the room's answer shows on the organizer's copy."""
    def answer() -> str | None:
        value = room_answer(item, room)
        return value if value not in (None, "Unknown", "NoResponseReceived") else None
    return wait_for(answer, WAIT, f"the answer of {room} to {item.subject!r}")


def responses(account: Account, subject: str) -> list[Any]:
    return [m for m in account.inbox.all() if isinstance(m, MeetingResponse) and subject in (m.subject or "")]


def wait_responses(account: Account, subject: str, count: int = 1) -> list[Any]:
    return wait_for(lambda: (found := responses(account, subject)) and len(found) >= count and found, WAIT,
                    f"{count} meeting response(s) about {subject!r} in {account.primary_smtp_address}'s Inbox")


def room_items(room: Account, start: EWSDateTime, end: EWSDateTime) -> list[CalendarItem]:
    return list(room.calendar.view(start=start, end=end))


# -- 1. extended properties ----------------------------------------------------------------------------
def test_command_key_on_an_organizer_meeting_round_trips_and_is_searchable(ews, props):
    alice = ews.organizer(ALICE)
    start = day_at(3, 9)
    item = CalendarItem(account=alice, folder=alice.calendar, subject="Keyed", start=start,
                        end=start + dt.timedelta(hours=1), resources=[ROOM], gateway_command_key="k1",
                        gateway_attempts=1)
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    other = CalendarItem(account=alice, folder=alice.calendar, subject="Other key", start=start,
                         end=start + dt.timedelta(hours=1), gateway_command_key="k2", gateway_attempts=10)
    other.save()
    plain = CalendarItem(account=alice, folder=alice.calendar, subject="No key", start=start,
                         end=start + dt.timedelta(hours=1))
    plain.save()

    got = alice.calendar.get(id=item.id)
    assert (got.gateway_command_key, got.gateway_attempts) == ("k1", 1)
    assert alice.calendar.get(id=plain.id).gateway_command_key is None

    # FindItem with a restriction on the extended property: IsEqualTo, Exists, And/Or/Not, a typed comparison.
    assert [i.subject for i in alice.calendar.filter(gateway_command_key="k1")] == ["Keyed"]
    assert sorted(i.subject for i in alice.calendar.filter(gateway_command_key__exists=True)) == ["Keyed", "Other key"]
    assert [i.subject for i in alice.calendar.filter(gateway_command_key__exists=False)] == ["No key"]
    assert sorted(i.subject for i in alice.calendar.filter(Q(gateway_command_key="k1") | Q(gateway_command_key="k2"))
                  ) == ["Keyed", "Other key"]
    assert [i.subject for i in alice.calendar.filter(~Q(gateway_command_key="k1"), gateway_command_key__exists=True)
            ] == ["Other key"]
    assert [i.subject for i in alice.calendar.filter(gateway_command_key="k1", subject="Keyed")] == ["Keyed"]
    assert [i.subject for i in alice.calendar.filter(gateway_attempts__gt=2)] == ["Other key"]
    assert list(alice.calendar.filter(gateway_command_key="nope")) == []
    # The FindItem result carries the property itself when the shape names it.
    [found] = alice.calendar.filter(gateway_command_key="k2").only("subject", "gateway_command_key")
    assert found.gateway_command_key == "k2"

    # UpdateItem: SetItemField and DeleteItemField with an ExtendedFieldURI.
    got.gateway_command_key = "k1-retry"
    got.save(update_fields=["gateway_command_key"], send_meeting_invitations="SendToNone")
    assert alice.calendar.get(id=item.id).gateway_command_key == "k1-retry"
    assert list(alice.calendar.filter(gateway_command_key="k1")) == []
    got = alice.calendar.get(id=item.id)
    got.gateway_command_key = None
    got.save(update_fields=["gateway_command_key"], send_meeting_invitations="SendToNone")
    got = alice.calendar.get(id=item.id)
    assert got.gateway_command_key is None and got.gateway_attempts == 1
    assert got.subject == "Keyed"

    # SyncFolderItems returns the property with the item.
    synced = {i.subject: i for change, i in alice.calendar.sync_items() if change != "delete"}
    assert synced["Other key"].gateway_command_key == "k2"
    assert synced["Keyed"].gateway_command_key is None


def test_command_key_on_a_room_appointment(ews, props):
    room = ews.room(ROOM)
    start = day_at(4, 10)
    appt = CalendarItem(account=room, folder=room.calendar, subject="Panel", start=start,
                        end=start + dt.timedelta(minutes=30), legacy_free_busy_status="Busy",
                        gateway_command_key="panel-1")
    appt.save()
    [found] = room.calendar.filter(gateway_command_key="panel-1")
    assert found.id == appt.id
    # The CalendarView the sync reads carries the key too (it is a "fast" property in FindItem).
    [seen] = room.calendar.view(start=start, end=start + dt.timedelta(hours=1)).only("subject", "gateway_command_key")
    assert seen.gateway_command_key == "panel-1"


def test_property_matching_needs_set_name_and_type(ews, props):
    """Exchange names a custom property by set + name (or id) + type; a different name or type is another one."""
    room = ews.room(ROOM)
    start = day_at(4, 12)
    appt = CalendarItem(account=room, folder=room.calendar, subject="Typed", start=start,
                        end=start + dt.timedelta(minutes=30), gateway_command_key="typed-1")
    appt.save()

    class SameNameOtherSet(ExtendedProperty):
        property_set_id = "c11ff724-aa03-4555-9952-8fa248a11c3e"
        property_name = "ExchangeGatewayCommandKey"
        property_type = "String"

    class SameSetByGuid(ExtendedProperty):
        property_set_id = "00020329-0000-0000-C000-000000000046"  # PublicStrings, named by its GUID
        property_name = "ExchangeGatewayCommandKey"
        property_type = "String"

    CalendarItem.register("other_set_key", SameNameOtherSet)
    CalendarItem.register("guid_key", SameSetByGuid)
    try:
        got = room.calendar.get(id=appt.id)
        assert got.other_set_key is None
        assert got.guid_key == "typed-1"
        assert [i.subject for i in room.calendar.filter(guid_key="typed-1")] == ["Typed"]
        assert list(room.calendar.filter(other_set_key="typed-1")) == []
    finally:
        CalendarItem.deregister("other_set_key")
        CalendarItem.deregister("guid_key")


# -- 2. meeting responses in the organizer's Inbox -----------------------------------------------------
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"


def raw_get_item(ews: Any, mailbox: str, item_id: str, properties: str) -> etree._Element:
    """GetItem as raw SOAP (for what exchangelib's MeetingResponse has no field for: UID, RecurrenceId)."""
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" xmlns:t="{TNS}">'
        '<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
        f'<t:PrimarySmtpAddress>{mailbox}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>'
        '</s:Header><s:Body><m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
        f'<t:AdditionalProperties>{properties}</t:AdditionalProperties></m:ItemShape>'
        f'<m:ItemIds><t:ItemId Id="{item_id}"/></m:ItemIds></m:GetItem></s:Body></s:Envelope>').encode()
    resp = requests.post(ews.url, data=body, auth=(f"CONTOSO\\{ORGANIZER_ACCOUNT}", SERVICE_PASSWORD), timeout=30,
                         headers={"Content-Type": "text/xml; charset=utf-8"})
    assert resp.status_code == 200, resp.text[:500]
    root = etree.fromstring(resp.content)
    assert root.findtext(f".//{{{MNS}}}ResponseCode") == "NoError", resp.text[:500]
    problem = validate(root.find(f"{{{SOAP}}}Body")[0])
    assert problem is None, problem
    [item] = root.find(f".//{{{MNS}}}Items")
    return item


GOID_URI = '<t:ExtendedFieldURI DistinguishedPropertySetId="Meeting" PropertyId="35" PropertyType="Binary"/>'


def control(ews: Any, method: str, path: str, body: Any = None) -> Any:
    """The simulator's HTTP control API (what a benchmark or an operator uses)."""
    resp = requests.request(method, f"{ews.thread.base_url}/control{path}", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {ews.sim.config.control_token}"})
    assert resp.status_code < 300, resp.text
    return resp.json()


def test_the_rooms_accept_reaches_the_organizers_inbox(ews, props):
    alice = ews.organizer(ALICE)
    start = day_at(3, 10)
    item = book(alice, "Q3 review", start, start + dt.timedelta(hours=1))
    other = book(alice, "Q4 review", start + dt.timedelta(hours=2), start + dt.timedelta(hours=3))
    assert decided(item) == "Accept" and decided(other) == "Accept"
    [msg] = wait_responses(alice, "Q3 review")
    item.refresh()

    assert isinstance(msg, MeetingResponse)
    assert msg.item_class == "IPM.Schedule.Meeting.Resp.Pos"
    assert msg.subject == "Accepted: Q3 review"
    assert msg.response_type == "Accept"
    assert msg.author.email_address == ROOM and msg.sender.email_address == ROOM
    assert [r.email_address for r in msg.to_recipients] == [ALICE]
    assert msg.body == RESPONSE_TEXT["Accept"]
    assert msg.is_read is False
    assert msg.associated_calendar_item_id.id == item.id
    assert msg.clean_global_object_id == item.clean_global_object_id

    # FindItem with a restriction on the CleanGlobalObjectId finds this meeting's answer only; GetItem reads it.
    found = list(alice.inbox.filter(clean_global_object_id=item.clean_global_object_id))
    assert [m.subject for m in found] == ["Accepted: Q3 review"]
    assert sorted(m.subject for m in alice.inbox.filter(item_class__startswith="IPM.Schedule.Meeting.Resp")) == [
        "Accepted: Q3 review", "Accepted: Q4 review"]
    assert list(alice.inbox.filter(item_class__startswith="Schedule.Meeting")) == []  # a prefix, not a substring
    got = alice.inbox.get(id=msg.id)
    assert isinstance(got, MeetingResponse) and got.body == RESPONSE_TEXT["Accept"]
    assert [m.subject for m in alice.inbox.filter(clean_global_object_id=b"\x04" * 40)] == []

    # The UID and the ids of the meeting are on the message, as on every copy of the meeting.
    raw = raw_get_item(ews, ALICE, msg.id, '<t:FieldURI FieldURI="calendar:UID"/>'
                                            '<t:FieldURI FieldURI="meeting:ResponseType"/>'
                                            '<t:FieldURI FieldURI="item:ItemClass"/>' + GOID_URI)
    assert etree.QName(raw).localname == "MeetingResponse"
    assert raw.findtext(f"{{{TNS}}}UID") == item.uid
    assert raw.findtext(f"{{{TNS}}}ResponseType") == "Accept"
    assert base64.b64decode(raw.findtext(f"{{{TNS}}}ExtendedProperty/{{{TNS}}}Value")) == item.clean_global_object_id

    # The client can mark it read and clean it up.
    got.is_read = True
    got.save(update_fields=["is_read"])
    assert alice.inbox.get(id=msg.id).is_read is True
    got = alice.inbox.get(id=msg.id)
    got.delete()
    assert [m.subject for m in responses(alice, "review")] == ["Accepted: Q4 review"]


def test_the_response_arrives_after_the_attendant_delay(sim_factory, props):
    ews = sim_factory(SimulatorConfig(rba_delay=0.5))
    alice = ews.organizer(ALICE)
    start = day_at(3, 11)
    item = book(alice, "Delayed", start, start + dt.timedelta(hours=1))
    [msg] = wait_responses(alice, "Delayed")
    assert msg.response_type == "Accept"

    def timing() -> tuple[dt.timedelta, dt.timedelta]:
        d = ews.sim.directory
        org = d.item(ids.parse_item_id(item.id)[1])
        answer = d.item(ids.parse_item_id(msg.id)[1])
        decision = next(x for x in ews.sim.attendant.decisions if x.subject == "Delayed")
        return decision.at - org.created, answer.created - org.created
    decided_after, answered_after = ews.call(timing)
    assert decided_after >= dt.timedelta(seconds=0.5) and answered_after >= dt.timedelta(seconds=0.5)


def test_responses_are_new_mail_and_sync_like_any_item(ews, props):
    """A client can learn of an answer by a subscription on the Inbox, or by syncing the Inbox."""
    alice = ews.organizer(ALICE)
    sub_id, watermark = alice.inbox.subscribe_to_pull(event_types=("NewMailEvent",))
    list(alice.inbox.sync_items())  # the Inbox as it is now
    state = alice.inbox.item_sync_state
    start = day_at(3, 14)
    item = book(alice, "Noticed", start, start + dt.timedelta(hours=1))
    [msg] = wait_responses(alice, "Noticed")

    def new_mail() -> list[str]:
        return [e.item_id.id for n in alice.inbox.get_events(sub_id, watermark) for e in n.events
                if type(e).__name__ == "NewMailEvent"]
    assert wait_for(new_mail, WAIT, "a NewMailEvent for the response") == [msg.id]
    alice.inbox.unsubscribe(sub_id)

    alice.inbox.item_sync_state = state
    changes = list(alice.inbox.sync_items())
    assert [(c, type(i).__name__, i.subject) for c, i in changes] == [
        ("create", "MeetingResponse", "Accepted: Noticed")]
    assert changes[0][1].clean_global_object_id == alice.calendar.get(id=item.id).clean_global_object_id


def _conflicting(ews: Any, alice: Account, start: EWSDateTime) -> None:
    bob = ews.organizer(BOB)
    first = book(bob, "Earlier booking", start, start + dt.timedelta(hours=1))
    assert decided(first) == "Accept"


REASONS: dict[str, tuple[dict[str, Any], Any]] = {
    "conflict": ({}, _conflicting),
    "outside_booking_window": ({"BookingWindowInDays": 2}, None),
    "too_long": ({"MaximumDurationInMinutes": 30}, None),
    "recurring_not_allowed": ({"AllowRecurringMeetings": False}, None),
    "not_permitted": ({"AllBookInPolicy": False, "BookInPolicy": [BOB]}, None),
}


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_each_decline_reason_comes_from_its_room_setting(ews, props, reason):
    values, before = REASONS[reason]
    if values:
        applied = control(ews, "PATCH", f"/rooms/{ROOM}/settings", values)
        assert all(applied[setting_name(k)] == (v if not isinstance(v, list) else [x.lower() for x in v])
                   for k, v in values.items())
    alice = ews.organizer(ALICE)
    start = day_at(5, 9)
    if before is not None:
        before(ews, alice, start)
    fields: dict[str, Any] = {}
    if reason == "recurring_not_allowed":
        fields["recurrence"] = Recurrence(pattern=DailyPattern(interval=1), start=start.date(), number=3)
    item = book(alice, f"Wanted {reason}", start, start + dt.timedelta(hours=1), **fields)

    assert decided(item) == "Decline"
    [msg] = wait_responses(alice, f"Wanted {reason}")
    assert msg.item_class == "IPM.Schedule.Meeting.Resp.Neg"
    assert msg.subject == f"Declined: Wanted {reason}"
    assert msg.response_type == "Decline"
    assert msg.author.email_address == ROOM
    item.refresh()
    assert msg.clean_global_object_id == item.clean_global_object_id
    # Exactly one reason sentence, the one for this setting: the gateway maps it back to the reason code.
    assert [r for r, text in DECLINE_REASON_TEXT.items() if text in msg.body] == [reason]
    assert msg.body.strip() == DECLINE_REASON_TEXT[reason]
    room = ews.room(ROOM)
    assert [i.subject for i in room_items(room, start, start + dt.timedelta(hours=1))] == (
        ["Bob Anders"] if reason == "conflict" else [])


def test_decline_without_details_and_booking_rights(ews, props):
    control(ews, "PATCH", f"/rooms/{ROOM}/settings", {"EnableResponseDetails": False,
                                                      "MaximumDurationInMinutes": 30})
    alice = ews.organizer(ALICE)
    start = day_at(5, 14)
    long = book(alice, "Long one", start, start + dt.timedelta(hours=2))
    assert decided(long) == "Decline"
    [msg] = wait_responses(alice, "Long one")
    assert msg.body == "Your request was declined."

    # BookInPolicy lets a named organizer book while AllBookInPolicy is off; RequestInPolicy holds for a delegate.
    control(ews, "PATCH", f"/rooms/{ROOM}/settings", {"AllBookInPolicy": False, "BookInPolicy": [ALICE],
                                                      "RequestInPolicy": [BOB], "MaximumDurationInMinutes": 1440})
    short = book(alice, "Allowed", start + dt.timedelta(hours=3), start + dt.timedelta(hours=4))
    assert decided(short) == "Accept"
    assert wait_responses(alice, "Allowed")[0].item_class == "IPM.Schedule.Meeting.Resp.Pos"
    bob = ews.organizer(BOB)
    held = book(bob, "Held", start + dt.timedelta(hours=5), start + dt.timedelta(hours=6))
    assert decided(held) == "Tentative"
    [tent] = wait_responses(bob, "Held")
    assert (tent.item_class, tent.subject, tent.response_type) == (
        "IPM.Schedule.Meeting.Resp.Tent", "Tentative: Held", "Tentative")
    [copy] = room_items(ews.room(ROOM), start + dt.timedelta(hours=5), start + dt.timedelta(hours=6))
    assert (copy.my_response_type, copy.legacy_free_busy_status) == ("Tentative", "Tentative")

    with pytest.raises(AssertionError, match="unknown_setting"):
        control(ews, "PATCH", f"/rooms/{ROOM}/settings", {"BookInPolicyx": [ALICE]})
    with pytest.raises(AssertionError, match="unknown_mailbox"):
        control(ews, "PATCH", f"/rooms/{ROOM}/settings", {"BookInPolicy": ["nobody@contoso.com"]})


# -- 3. declining as the room --------------------------------------------------------------------------
def room_copy_of(room: Account, item: CalendarItem) -> CalendarItem | None:
    """The room's copy, found the way the gateway finds it: by the meeting's CleanGlobalObjectId."""
    item.refresh()
    found = list(room.calendar.filter(clean_global_object_id=item.clean_global_object_id))
    return found[0] if found else None


def test_room_declines_a_meeting_with_a_message(ews, props):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(6, 10)
    item = book(alice, "Offsite prep", start, start + dt.timedelta(hours=1))
    assert decided(item) == "Accept"
    copy = room_copy_of(room, item)
    assert copy is not None

    copy.decline(body="The room is closed for maintenance.")  # DeclineItem, SendAndSaveCopy, as the room

    assert room_copy_of(room, item) is None
    assert room_items(room, start, start + dt.timedelta(hours=1)) == []
    assert room_answer(item) == "Decline"
    item.refresh()
    assert item.subject == "Offsite prep" and item.start == start  # the organizer's meeting stays intact
    [msg] = [m for m in wait_responses(alice, "Declined:") if m.clean_global_object_id == item.clean_global_object_id]
    assert msg.item_class == "IPM.Schedule.Meeting.Resp.Neg"
    assert msg.response_type == "Decline"
    assert msg.author.email_address == ROOM
    assert "The room is closed for maintenance." in msg.body
    assert msg.associated_calendar_item_id.id == item.id
    # SendAndSaveCopy: the room keeps the sent answer.
    assert [m.subject for m in room.sent.all()] == [msg.subject]


def test_room_declines_one_occurrence(ews, props):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(6, 13)
    series = book(alice, "Daily standup", start, start + dt.timedelta(minutes=30),
                  recurrence=Recurrence(pattern=DailyPattern(interval=1), start=start.date(), number=3))
    assert decided(series) == "Accept"
    second = start + dt.timedelta(days=1)
    [occ] = room_items(room, second, second + dt.timedelta(minutes=30))
    assert occ.type == "Occurrence"
    occ.decline(body="Cleaning on that day.")

    assert room_items(room, second, second + dt.timedelta(minutes=30)) == []
    assert len(room_items(room, start, start + dt.timedelta(days=3))) == 2
    assert room_answer(series) == "Accept"  # the series as a whole stays accepted
    [msg] = [m for m in wait_responses(alice, "Declined:") if "Cleaning on that day." in m.body]
    assert msg.clean_global_object_id == series.clean_global_object_id
    raw = raw_get_item(ews, ALICE, msg.id, '<t:FieldURI FieldURI="calendar:RecurrenceId"/>'
                                           '<t:FieldURI FieldURI="calendar:UID"/>')
    assert raw.findtext(f"{{{TNS}}}RecurrenceId") == second.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert raw.findtext(f"{{{TNS}}}UID") == series.uid


# -- 4. the write paths of the gateway's commands ------------------------------------------------------
def test_organizer_meeting_created_moved_into_a_conflict_moved_back_and_cancelled(ews, props):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(7, 9)
    item = CalendarItem(account=alice, folder=alice.calendar, subject="Planning", start=start,
                        end=start + dt.timedelta(hours=1), resources=[ROOM], gateway_command_key="create-1")
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    other = book(bob, "Blocker", start + dt.timedelta(hours=3), start + dt.timedelta(hours=4))
    assert decided(item) == "Accept" and decided(other) == "Accept"
    assert [i.subject for i in alice.calendar.filter(gateway_command_key="create-1")] == ["Planning"]

    # Move into Bob's slot: the attendant re-evaluates and declines for the conflict.
    item.refresh()
    item.start, item.end = start + dt.timedelta(hours=3, minutes=30), start + dt.timedelta(hours=4, minutes=30)
    item.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert decided(item) == "Decline"
    declined = wait_responses(alice, "Declined: Planning")
    assert declined[-1].body == DECLINE_REASON_TEXT["conflict"]
    assert room_copy_of(room, item) is None
    assert [i.subject for i in room_items(room, start, start + dt.timedelta(hours=6))] == ["Bob Anders"]

    # Move to a free slot: accepted again; the key stays on the item.
    item.refresh()
    item.start, item.end = start + dt.timedelta(hours=6), start + dt.timedelta(hours=7)
    item.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert decided(item) == "Accept"
    copy = room_copy_of(room, item)
    assert copy is not None and (copy.start, copy.end) == (item.start, item.end)
    assert alice.calendar.get(id=item.id).gateway_command_key == "create-1"
    assert len(wait_responses(alice, "Accepted: Planning", 2)) == 2

    # Cancel (CancelCalendarItem): the organizer's copy goes and the room's copy follows.
    item.refresh()
    item.cancel()
    assert list(alice.calendar.filter(gateway_command_key="create-1")) == []
    wait_for(lambda: room_items(room, item.start, item.end) == [], WAIT, "the room to drop the cancelled meeting")
    assert room_copy_of(room, other) is not None


def test_room_appointment_created_moved_and_deleted_by_the_service_account(ews, props):
    room = ews.room(ROOM)
    start = day_at(8, 10)
    appt = CalendarItem(account=room, folder=room.calendar, subject="Walk-in", start=start,
                        end=start + dt.timedelta(minutes=30), legacy_free_busy_status="Busy",
                        gateway_command_key="panel-7")
    appt.save()
    [seen] = room_items(room, start, start + dt.timedelta(hours=2))
    assert (seen.subject, seen.is_meeting, seen.organizer.email_address) == ("Walk-in", False, ROOM)

    appt.refresh()
    appt.start, appt.end = start + dt.timedelta(hours=1), start + dt.timedelta(hours=1, minutes=45)
    appt.save(update_fields=["start", "end"])
    [seen] = room_items(room, start, start + dt.timedelta(hours=3))
    assert (seen.start, seen.end) == (start + dt.timedelta(hours=1), start + dt.timedelta(hours=1, minutes=45))
    assert room.calendar.get(id=appt.id).gateway_command_key == "panel-7"

    appt.refresh()
    appt.delete()
    assert room_items(room, start, start + dt.timedelta(hours=3)) == []
    assert list(room.calendar.filter(gateway_command_key="panel-7")) == []
    # Nothing went through the booking attendant.
    assert ews.call(lambda: [d for d in ews.sim.attendant.decisions if d.room == ROOM]) == []


def test_availability_of_several_rooms(ews, props):
    alice, room2 = ews.organizer(ALICE), ews.room(ROOM2)
    start = day_at(9, 8)
    meeting = book(alice, "Board", start + dt.timedelta(hours=1), start + dt.timedelta(hours=2))
    assert decided(meeting) == "Accept"
    CalendarItem(account=room2, folder=room2.calendar, subject="Panel", start=start + dt.timedelta(hours=3),
                 end=start + dt.timedelta(hours=3, minutes=30), legacy_free_busy_status="Busy").save()

    service = ews.room(ROOM)  # the rooms-scoped service account asks
    rooms = [ROOM, ROOM2, "room3@contoso.com"]
    infos = list(service.protocol.get_free_busy_info(accounts=[(r, "Required", False) for r in rooms],
                                                     start=start, end=start + dt.timedelta(hours=10)))
    busy = {r: [(e.start, e.end, e.busy_type) for e in info.calendar_events or []] for r, info in zip(rooms, infos)}
    assert busy[ROOM] == [(start + dt.timedelta(hours=1), start + dt.timedelta(hours=2), "Busy")]
    assert busy[ROOM2] == [(start + dt.timedelta(hours=3), start + dt.timedelta(hours=3, minutes=30), "Busy")]
    assert busy["room3@contoso.com"] == []
