"""Calendar items through exchangelib over HTTP + NTLM: meetings, recurrence, identities, views and errors.

Each test pins down what Exchange 2016 does (docs/exchange-semantics.md, sections 2.2, 2.3, 3, 4 and 7), so that a
client written against the simulator hits the same walls it would hit on a real server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from exchangelib import (
    DELEGATE,
    IMPERSONATION,
    Account,
    CalendarItem,
    EWSDate,
    EWSDateTime,
    EWSTimeZone,
    ExtendedProperty,
    HTMLBody,
)
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorCalendarIsNotOrganizer,
    ErrorCalendarIsOrganizerForDecline,
    ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange,
    ErrorCalendarOccurrenceIsDeletedFromRecurrence,
    ErrorCalendarViewRangeTooBig,
    ErrorImpersonateUserDenied,
    ErrorInvalidPropertyRequest,
)
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY
from exchangelib.properties import FieldPath
from exchangelib.recurrence import (
    AbsoluteMonthlyPattern,
    AbsoluteYearlyPattern,
    DailyPattern,
    EndDatePattern,
    NoEndPattern,
    NumberedPattern,
    Recurrence,
    RelativeMonthlyPattern,
    RelativeYearlyPattern,
    WeeklyPattern,
)
from exchangelib.services import FindItem
from lxml import etree

from tests.conftest import TZ, wait_decisions

ROOM = "room1@contoso.com"
ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
CAROL = "carol@contoso.com"
ORGANIZER_SERVICE = "CONTOSO\\svc-organizers"
GOID_HEADER = bytes.fromhex("040000008200E00074C5B7101A82E008")


class CleanGlobalObjectId(ExtendedProperty):
    """PidLidCleanGlobalObjectId: PSETID_Meeting, LID 0x23, binary; the same on every copy of a meeting."""

    distinguished_property_set_id = "Meeting"
    property_id = 0x23
    property_type = "Binary"


class GatewayBookingId(ExtendedProperty):
    """The gateway's own booking key, stamped on items it writes (PublicStrings, named)."""

    distinguished_property_set_id = "PublicStrings"
    property_name = "GatewayBookingId"
    property_type = "String"


@pytest.fixture
def ext_props() -> Iterator[None]:
    """Register the extended properties on CalendarItem for one test only (registration is class-global)."""
    # The gateway registers some of these for good when its EWS modules are imported: leave those in place.
    added = []
    for name, prop in (("clean_global_object_id", CleanGlobalObjectId), ("gateway_booking_id", GatewayBookingId)):
        if name not in {f.name for f in CalendarItem.FIELDS}:
            CalendarItem.register(name, prop)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            CalendarItem.deregister(name)


# -- helpers -------------------------------------------------------------------------------------------
def day_at(days: int, hour: int, minute: int = 0) -> EWSDateTime:
    base = EWSDateTime.now(TZ) + dt.timedelta(days=days)
    return base.replace(hour=hour, minute=minute, second=0, microsecond=0)


def account(ews: Any, smtp: str, tz: str) -> Account:
    """``smtp`` impersonated by the organizer-scoped service account, on a client living in zone ``tz``."""
    return Account(smtp, config=ews.config(ORGANIZER_SERVICE), access_type=IMPERSONATION, autodiscover=False,
                   default_timezone=EWSTimeZone(tz))


def meeting(acc: Account, subject: str, start: EWSDateTime, end: EWSDateTime, *, rooms: tuple[str, ...] = (ROOM,),
            **fields: Any) -> CalendarItem:
    item = CalendarItem(account=acc, folder=acc.calendar, subject=subject, start=start, end=end,
                        resources=list(rooms), **fields)
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    return item


def appointment(acc: Account, subject: str, start: EWSDateTime, end: EWSDateTime, **fields: Any) -> CalendarItem:
    item = CalendarItem(account=acc, folder=acc.calendar, subject=subject, start=start, end=end, **fields)
    item.save()
    return item


def by_uid(acc: Account, uid: str) -> CalendarItem | None:
    return next((i for i in acc.calendar.all() if i.uid == uid), None)


def resource_response(item: CalendarItem, room: str = ROOM) -> str | None:
    item.refresh()
    return next((a.response_type for a in item.resources or [] if a.mailbox.email_address == room), None)


def local(value: EWSDateTime, tz: Any = TZ) -> tuple[dt.date, dt.time]:
    v = value.astimezone(tz)
    return v.date(), v.time()


# -- single meetings and identities ------------------------------------------------------------------------
def test_single_meeting_reaches_every_attendee_with_one_identity(ews, ext_props):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(3, 10)
    item = meeting(alice, "Team sync", start, start + dt.timedelta(hours=1), required_attendees=[BOB],
                   body=HTMLBody("<p>agenda</p>"), location="HQ Room 1")
    assert wait_decisions(ews, "Team sync")[-1].outcome == "accepted"

    item.refresh()
    assert item.type == "Single"
    assert item.is_meeting is True
    assert item.my_response_type == "Organizer"
    assert item.organizer.email_address == ALICE
    assert item.meeting_request_was_sent is True
    assert [a.mailbox.email_address for a in item.required_attendees] == [BOB]
    assert item.required_attendees[0].response_type == "Unknown"
    assert resource_response(item) == "Accept"

    bob_copy = by_uid(bob, item.uid)
    room_copy = by_uid(room, item.uid)
    assert bob_copy is not None and room_copy is not None
    # A person's copy arrives at once, tentatively, with the organizer's subject and body.
    assert bob_copy.subject == "Team sync"
    assert "agenda" in bob_copy.body
    assert bob_copy.my_response_type == "NoResponseReceived"
    assert bob_copy.legacy_free_busy_status == "Tentative"
    assert bob_copy.organizer.email_address == ALICE
    assert (bob_copy.start, bob_copy.end) == (start, start + dt.timedelta(hours=1))

    # One meeting, three mailboxes: UID and CleanGlobalObjectId agree; ItemId and ChangeKey are per copy.
    goid = item.clean_global_object_id
    assert isinstance(goid, bytes) and goid.startswith(GOID_HEADER)
    assert goid[16:20] == b"\x00\x00\x00\x00"  # the instance-date bytes of the *clean* GOID are zero
    for copy in (bob_copy, room_copy):
        assert copy.uid == item.uid
        assert copy.clean_global_object_id == goid
        assert copy.id != item.id
        assert copy.changekey != item.changekey
    assert bob_copy.id != room_copy.id

    # The gateway's lookup: the room's copy by CleanGlobalObjectId, with a FindItem restriction.
    found = list(room.calendar.filter(clean_global_object_id=goid))
    assert [f.id for f in found] == [room_copy.id]

    # Bob accepts: the organizer's copy records it.
    bob_copy.accept()
    item.refresh()
    assert item.required_attendees[0].response_type == "Accept"


def test_change_key_changes_on_every_update(ews):
    alice = ews.organizer(ALICE)
    start = day_at(4, 9)
    item = appointment(alice, "v1", start, start + dt.timedelta(minutes=30))
    item_id, keys = item.id, [item.changekey]
    for n in (2, 3, 4):
        item.subject = f"v{n}"
        item.save(update_fields=["subject"])
        keys.append(item.changekey)
        assert item.id == item_id
    assert len(set(keys)) == 4
    fetched = alice.calendar.get(id=item_id)
    assert (fetched.subject, fetched.changekey) == ("v4", keys[-1])


# -- recurrence ----------------------------------------------------------------------------------------------
RECURRENCES = {
    # name: (pattern, boundary, expected local dates, view range in days from the first date)
    "daily-every-2-numbered": (
        DailyPattern(interval=2), NumberedPattern(start=EWSDate(2027, 3, 1), number=4),
        ["2027-03-01", "2027-03-03", "2027-03-05", "2027-03-07"], 30),
    "weekly-mon-wed-fri-end-date": (
        WeeklyPattern(interval=1, weekdays=["Monday", "Wednesday", "Friday"], first_day_of_week="Monday"),
        EndDatePattern(start=EWSDate(2027, 3, 1), end=EWSDate(2027, 3, 12)),
        ["2027-03-01", "2027-03-03", "2027-03-05", "2027-03-08", "2027-03-10", "2027-03-12"], 30),
    "weekly-every-2-no-end": (
        WeeklyPattern(interval=2, weekdays=["Tuesday"], first_day_of_week="Monday"),
        NoEndPattern(start=EWSDate(2027, 3, 2)),
        ["2027-03-02", "2027-03-16", "2027-03-30", "2027-04-13"], 43),
    "absolute-monthly-31st": (
        AbsoluteMonthlyPattern(interval=1, day_of_month=31), NumberedPattern(start=EWSDate(2027, 1, 31), number=4),
        ["2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30"], 120),
    "relative-monthly-second-tuesday": (
        RelativeMonthlyPattern(interval=1, weekday="Tuesday", week_number="Second"),
        EndDatePattern(start=EWSDate(2027, 1, 12), end=EWSDate(2027, 3, 31)),
        ["2027-01-12", "2027-02-09", "2027-03-09"], 120),
    "relative-monthly-last-friday": (
        RelativeMonthlyPattern(interval=2, weekday="Friday", week_number="Last"),
        NumberedPattern(start=EWSDate(2027, 1, 29), number=3),
        ["2027-01-29", "2027-03-26", "2027-05-28"], 150),
    "absolute-yearly": (
        AbsoluteYearlyPattern(day_of_month=15, month="March"), NumberedPattern(start=EWSDate(2027, 3, 15), number=2),
        ["2027-03-15", "2028-03-15"], 400),
    "relative-yearly-first-monday-september": (
        RelativeYearlyPattern(weekday="Monday", week_number="First", month="September"),
        NoEndPattern(start=EWSDate(2027, 9, 6)),
        ["2027-09-06", "2028-09-04"], 400),
}


@pytest.mark.parametrize("name", list(RECURRENCES))
def test_recurrence_patterns_expand_in_calendar_view(ews, name):
    pattern, boundary, expected, span = RECURRENCES[name]
    alice = ews.organizer(ALICE)
    first = dt.date.fromisoformat(expected[0])
    start = EWSDateTime(first.year, first.month, first.day, 9, 30, tzinfo=TZ)
    master = appointment(alice, name, start, start + dt.timedelta(hours=1),
                         recurrence=Recurrence(pattern=pattern, boundary=boundary))

    view_start = EWSDateTime(first.year, first.month, first.day, tzinfo=TZ)
    view = list(alice.calendar.view(start=view_start, end=view_start + dt.timedelta(days=span)))
    assert [local(o.start) for o in view] == [(dt.date.fromisoformat(d), dt.time(9, 30)) for d in expected]
    assert all(o.end - o.start == dt.timedelta(hours=1) for o in view)
    assert {o.type for o in view} == {"Occurrence"}
    assert {o.subject for o in view} == {name}
    assert all(o.is_recurring for o in view)
    assert len({o.id for o in view}) == len(view)  # each occurrence has its own (synthetic) id

    master.refresh()
    assert master.type == "RecurringMaster"
    assert master.recurrence.pattern == pattern
    assert type(master.recurrence.boundary) is type(boundary)
    assert master.recurrence.boundary.start == boundary.start
    assert master.first_occurrence.start == view[0].start
    if isinstance(boundary, NoEndPattern):
        assert master.last_occurrence is None
    else:
        assert master.last_occurrence.start == view[-1].start
    # CalendarView shows occurrences, never the master itself.
    assert master.id not in {o.id for o in view}
    # FindItem without a view lists the master only.
    assert [(i.id, i.type) for i in alice.calendar.all()] == [(master.id, "RecurringMaster")]


def test_modified_and_deleted_occurrences(ews):
    alice = ews.organizer(ALICE)
    start = EWSDateTime(2027, 3, 1, 9, tzinfo=TZ)
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=5))
    master = appointment(alice, "Daily", start, start + dt.timedelta(minutes=30), recurrence=rec)
    master_key = master.changekey

    second = master.occurrence(2)
    second.refresh()
    assert (second.type, second.start) == ("Occurrence", start + dt.timedelta(days=1))
    second.start += dt.timedelta(hours=2)
    second.end += dt.timedelta(hours=2)
    second.subject = "Daily (moved)"
    second.save(update_fields=["start", "end", "subject"])

    fourth = master.occurrence(4)
    fourth.refresh()
    fourth.delete()

    master.refresh()
    assert master.changekey != master_key  # a change to one instance is a change of the master
    [modified] = master.modified_occurrences
    assert modified.original_start == start + dt.timedelta(days=1)
    assert modified.start == start + dt.timedelta(days=1, hours=2)
    assert modified.end == start + dt.timedelta(days=1, hours=2, minutes=30)
    assert [d.start for d in master.deleted_occurrences] == [start + dt.timedelta(days=3)]
    assert master.first_occurrence.start == start
    assert master.last_occurrence.start == start + dt.timedelta(days=4)

    view = list(alice.calendar.view(start=start - dt.timedelta(hours=1), end=start + dt.timedelta(days=7)))
    assert [(o.type, local(o.start)[0].day, local(o.start)[1].hour, o.subject) for o in view] == [
        ("Occurrence", 1, 9, "Daily"),
        ("Exception", 2, 11, "Daily (moved)"),
        ("Occurrence", 3, 9, "Daily"),
        ("Occurrence", 5, 9, "Daily"),
    ]
    exception = view[1]
    assert exception.original_start == start + dt.timedelta(days=1)
    assert exception.recurrence_id == start + dt.timedelta(days=1)

    # From an occurrence back to its series.
    back = view[2].recurring_master()
    back.refresh()
    assert (back.id, back.type, back.subject) == (master.id, "RecurringMaster", "Daily")

    # Exchange's answers for a deleted instance and an index past the end of the series.
    with pytest.raises(ErrorCalendarOccurrenceIsDeletedFromRecurrence):
        master.occurrence(4).refresh()
    with pytest.raises(ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange):
        master.occurrence(6).refresh()


@pytest.mark.parametrize(("creator_tz", "reader_tz", "first", "hour", "utc_hours"), [
    # EU summer time starts 2027-03-28: 09:00 Berlin is 08:00Z, then 07:00Z.
    ("Europe/Berlin", "America/New_York", dt.date(2027, 3, 15), 9, [8, 8, 7, 7]),
    # US summer time starts 2027-03-14: 10:00 New York is 15:00Z, then 14:00Z.
    ("America/New_York", "Europe/Berlin", dt.date(2027, 2, 28), 10, [15, 15, 14, 14]),
])
def test_recurrence_keeps_wall_clock_across_dst(ews, creator_tz, reader_tz, first, hour, utc_hours):
    creator, reader = account(ews, ALICE, creator_tz), account(ews, ALICE, reader_tz)
    ctz = EWSTimeZone(creator_tz)
    start = EWSDateTime(first.year, first.month, first.day, hour, tzinfo=ctz)
    rec = Recurrence(pattern=WeeklyPattern(interval=1, weekdays=[first.strftime("%A")], first_day_of_week="Monday"),
                     boundary=NumberedPattern(start=first, number=4))
    appointment(creator, "Weekly", start, start + dt.timedelta(hours=1), recurrence=rec)

    rtz = EWSTimeZone(reader_tz)
    view = list(reader.calendar.view(start=EWSDateTime(2027, 2, 20, tzinfo=rtz),
                                     end=EWSDateTime(2027, 4, 30, tzinfo=rtz)))
    assert [o.start.astimezone(EWSTimeZone("UTC")).hour for o in view] == utc_hours
    assert [local(o.start, ctz) for o in view] == [(first + dt.timedelta(weeks=n), dt.time(hour)) for n in range(4)]
    assert all(o.end - o.start == dt.timedelta(hours=1) for o in view)


def test_occurrence_spanning_the_dst_switch_keeps_its_local_end(ews):
    berlin = account(ews, ALICE, "Europe/Berlin")
    start = EWSDateTime(2027, 3, 26, 1, 30, tzinfo=TZ)  # 01:30-03:30 nightly; on 2027-03-28 02:00 becomes 03:00
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=4))
    appointment(berlin, "Night job", start, start + dt.timedelta(hours=2), recurrence=rec)
    view = list(berlin.calendar.view(start=start - dt.timedelta(hours=2), end=start + dt.timedelta(days=4)))
    assert [(local(o.start), local(o.end)) for o in view] == [
        ((dt.date(2027, 3, d), dt.time(1, 30)), (dt.date(2027, 3, d), dt.time(3, 30))) for d in (26, 27, 28, 29)]
    assert [o.end - o.start for o in view] == [dt.timedelta(hours=h) for h in (2, 2, 1, 2)]


def test_all_day_series_across_dst_stays_midnight_to_midnight(ews):
    pacific = account(ews, ALICE, "America/Los_Angeles")
    pst = EWSTimeZone("America/Los_Angeles")
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=EWSDate(2027, 3, 13), number=3))
    CalendarItem(account=pacific, folder=pacific.calendar, subject="Conference", is_all_day=True,
                 start=EWSDate(2027, 3, 13), end=EWSDate(2027, 3, 13), recurrence=rec).save()
    window = {"start": EWSDateTime(2027, 3, 10, tzinfo=pst), "end": EWSDateTime(2027, 3, 20, tzinfo=pst)}
    for tz in ("America/Los_Angeles", "UTC", "Europe/Berlin"):
        reader = account(ews, ALICE, tz)
        view = list(reader.calendar.view(**window))
        assert [(o.start, o.is_all_day, o.type) for o in view] == [
            (EWSDate(2027, 3, d), True, "Occurrence") for d in (13, 14, 15)], tz
    # The instants themselves (without is_all_day exchangelib leaves them alone): local midnight to midnight, so
    # the occurrence on 2027-03-14, the day summer time starts, lasts 23 hours.
    # Beware: exchangelib turns that occurrence's end into the date 2027-03-13 (it subtracts 24 h before converting).
    raw = list(pacific.calendar.view(**window).only("start", "end"))
    assert [(o.start.astimezone(pst), o.end.astimezone(pst)) for o in raw] == [
        (EWSDateTime(2027, 3, d, tzinfo=pst), EWSDateTime(2027, 3, d + 1, tzinfo=pst)) for d in (13, 14, 15)]
    assert [o.end - o.start for o in raw] == [dt.timedelta(hours=h) for h in (24, 23, 24)]
    # A view of the next day must not see the DST day's occurrence.
    day = list(pacific.calendar.view(start=EWSDateTime(2027, 3, 15, tzinfo=pst),
                                     end=EWSDateTime(2027, 3, 16, tzinfo=pst)))
    assert [o.start for o in day] == [EWSDate(2027, 3, 15)]


def test_all_day_event_reads_the_same_dates_in_every_zone(ews):
    pacific = account(ews, ALICE, "America/Los_Angeles")
    item = CalendarItem(account=pacific, folder=pacific.calendar, subject="Offsite", is_all_day=True,
                        start=EWSDate(2027, 3, 10), end=EWSDate(2027, 3, 11))  # exchangelib: end date inclusive
    item.save()
    # Stored as midnight to midnight in the creating zone (PST, UTC-8).
    stored = ews.call(lambda: [(i.start, i.end, i.tz, i.all_day) for i in
                               ews.sim.directory.get(ALICE).calendar.items.values()])
    assert stored == [(dt.datetime(2027, 3, 10, 8, tzinfo=dt.UTC), dt.datetime(2027, 3, 12, 8, tzinfo=dt.UTC),
                       "Pacific Standard Time", True)]

    for tz in ("UTC", "Europe/Berlin", "Asia/Tokyo", "Pacific/Auckland", "America/Los_Angeles"):
        reader = account(ews, ALICE, tz)
        rtz = EWSTimeZone(tz)
        view = list(reader.calendar.view(start=EWSDateTime(2027, 3, 8, tzinfo=rtz),
                                         end=EWSDateTime(2027, 3, 14, tzinfo=rtz)))
        assert [(o.subject, o.is_all_day, o.start, o.end) for o in view] == [
            ("Offsite", True, EWSDate(2027, 3, 10), EWSDate(2027, 3, 11))], tz
        got = reader.calendar.get(id=item.id)
        assert (got.start, got.end) == (EWSDate(2027, 3, 10), EWSDate(2027, 3, 11)), tz

    # Times that are not midnight are pushed out to the surrounding midnights of the creating zone.
    berlin = account(ews, ALICE, "Europe/Berlin")
    odd = CalendarItem(account=berlin, folder=berlin.calendar, subject="Odd", is_all_day=True,
                       start=EWSDateTime(2027, 4, 1, 10, tzinfo=TZ), end=EWSDateTime(2027, 4, 1, 15, tzinfo=TZ))
    odd.save()
    got = pacific.calendar.get(id=odd.id)
    assert (got.is_all_day, got.start, got.end) == (True, EWSDate(2027, 4, 1), EWSDate(2027, 4, 1))


# -- updates, cancellations and declines seen by the room ---------------------------------------------------
def test_moving_and_extending_a_meeting_makes_the_room_reevaluate(ews):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(5, 10)
    item = meeting(alice, "Review", start, start + dt.timedelta(hours=1))
    meeting(bob, "Blocker", start + dt.timedelta(hours=4), start + dt.timedelta(hours=5))
    assert wait_decisions(ews, "Review")[-1].outcome == "accepted"
    assert wait_decisions(ews, "Blocker")[-1].outcome == "accepted"
    item.refresh()
    uid = item.uid

    # Move into a free slot: accepted again, the room's copy follows.
    item.start, item.end = start + dt.timedelta(hours=2), start + dt.timedelta(hours=3)
    item.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decisions(ews, "Review", 2)[-1].outcome == "accepted"
    copy = by_uid(room, uid)
    assert copy is not None
    assert (copy.start, copy.end) == (start + dt.timedelta(hours=2), start + dt.timedelta(hours=3))
    assert resource_response(item) == "Accept"

    # Extend into Bob's booking: declined, the room's copy goes, the organizer's meeting stays as changed.
    item.end = start + dt.timedelta(hours=4, minutes=30)
    item.save(update_fields=["end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    d = wait_decisions(ews, "Review", 3)[-1]
    assert (d.outcome, d.reason) == ("declined", "conflict")
    assert by_uid(room, uid) is None
    assert resource_response(item) == "Decline"
    assert item.end == start + dt.timedelta(hours=4, minutes=30)
    assert [c.subject for c in room.calendar.view(start=start, end=start + dt.timedelta(hours=6))] == ["Bob Anders"]


def test_cancel_and_delete_with_cancellations_remove_the_room_copy(ews):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(6, 9)
    cancelled = meeting(alice, "Cancelled", start, start + dt.timedelta(hours=1), required_attendees=[BOB])
    deleted = meeting(alice, "Deleted", start + dt.timedelta(hours=2), start + dt.timedelta(hours=3))
    wait_decisions(ews, "Cancelled")
    wait_decisions(ews, "Deleted")
    cancelled.refresh()
    deleted.refresh()
    uids = cancelled.uid, deleted.uid
    assert by_uid(room, uids[0]) is not None and by_uid(room, uids[1]) is not None

    # As the room, cancelling is refused: only the organizer cancels (bug #17).
    room_copy = by_uid(room, uids[0])
    assert room_copy is not None
    with pytest.raises(ErrorCalendarIsNotOrganizer):
        room_copy.cancel()

    cancelled.cancel()
    deleted.delete(send_meeting_cancellations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decisions(ews, "Cancelled", 2)[-1].outcome == "cancelled"
    assert wait_decisions(ews, "Deleted", 2)[-1].outcome == "cancelled"
    assert by_uid(room, uids[0]) is None and by_uid(room, uids[1]) is None
    assert room.calendar.view(start=start, end=start + dt.timedelta(hours=3)).count() == 0
    assert list(alice.calendar.all()) == []
    # A person's copy stays, marked cancelled (bug #16: a cancellation is not always a Delete).
    bob_copy = by_uid(bob, uids[0])
    assert bob_copy is not None
    assert bob_copy.is_cancelled is True
    assert bob_copy.subject == "Canceled: Cancelled"


def test_room_declines_its_copy_and_the_organizer_keeps_the_meeting(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(7, 14)
    item = meeting(alice, "Kickoff", start, start + dt.timedelta(hours=1))
    assert wait_decisions(ews, "Kickoff")[-1].outcome == "accepted"
    item.refresh()
    room_copy = by_uid(room, item.uid)
    assert room_copy is not None and room_copy.my_response_type == "Accept"

    room_copy.decline()
    assert by_uid(room, item.uid) is None
    assert room.calendar.view(start=start, end=start + dt.timedelta(hours=1)).count() == 0
    assert resource_response(item) == "Decline"
    assert (item.subject, item.is_cancelled, item.start) == ("Kickoff", False, start)
    assert [i.id for i in alice.calendar.all()] == [item.id]


def test_decline_on_the_gateways_own_appointment_fails(ews):
    room = ews.room(ROOM)
    start = day_at(7, 16)
    appt = appointment(room, "Walk-in", start, start + dt.timedelta(minutes=30), legacy_free_busy_status="Busy")
    appt.refresh()
    assert (appt.is_meeting, appt.my_response_type) == (False, "Organizer")
    with pytest.raises(ErrorCalendarIsOrganizerForDecline):
        appt.decline()
    assert [i.subject for i in room.calendar.all()] == ["Walk-in"]
    appt.delete()  # the right way to remove one's own appointment
    assert list(room.calendar.all()) == []


# -- CalendarView limits and FindItem rules ----------------------------------------------------------------
def test_calendar_view_over_two_years_is_refused(ews):
    alice = ews.organizer(ALICE)
    start = EWSDateTime(2027, 1, 1, tzinfo=TZ)
    with pytest.raises(ErrorCalendarViewRangeTooBig):
        list(alice.calendar.view(start=start, end=start + dt.timedelta(days=800)))
    assert list(alice.calendar.view(start=start, end=start + dt.timedelta(days=700))) == []


def test_max_entries_returned_truncates_the_view(ews):
    alice = ews.organizer(ALICE)
    start = EWSDateTime(2027, 5, 3, 8, tzinfo=TZ)
    for n in range(5):
        appointment(alice, f"slot {n}", start + dt.timedelta(hours=n), start + dt.timedelta(hours=n, minutes=30))
    responses: list[bytes] = []
    ews.call(lambda: setattr(ews.sim, "recorder", lambda op, req, resp: responses.append(resp)
                             if op == "FindItem" else None))

    day_end = start + dt.timedelta(hours=12)
    page = list(alice.calendar.view(start=start, end=day_end, max_items=3))
    assert [i.subject for i in page] == ["slot 0", "slot 1", "slot 2"]
    root = _root_folder(responses[-1])
    assert (root.get("TotalItemsInView"), root.get("IncludesLastItemInRange")) == ("5", "false")

    # The remedy (bug #10): query again from where the page ended.
    rest = list(alice.calendar.view(start=page[-1].end, end=day_end, max_items=3))
    assert [i.subject for i in rest] == ["slot 3", "slot 4"]
    root = _root_folder(responses[-1])
    assert (root.get("TotalItemsInView"), root.get("IncludesLastItemInRange")) == ("2", "true")


def _root_folder(response: bytes) -> Any:
    root = etree.fromstring(response).find(".//{*}RootFolder")
    assert root is not None
    return root


def test_find_item_refuses_body_but_get_item_returns_it(ews):
    alice = ews.organizer(ALICE)
    start = day_at(8, 9)
    item = appointment(alice, "With body", start, start + dt.timedelta(hours=1), body=HTMLBody("<p>details</p>"))
    body_path = FieldPath(field=CalendarItem.get_field_by_fieldname("body"))
    with pytest.raises(ErrorInvalidPropertyRequest):
        list(FindItem(account=alice).call(
            folders=[alice.calendar], additional_fields=[body_path], restriction=None, order_fields=None,
            shape="IdOnly", query_string=None, depth="Shallow", calendar_view=None, max_items=None, offset=0))
    fetched = alice.calendar.get(id=item.id)
    assert "details" in fetched.body
    # exchangelib knows: asking a view for the body makes it FindItem (ids) + GetItem.
    [viewed] = alice.calendar.view(start=start, end=start + dt.timedelta(hours=1)).only("subject", "body")
    assert (viewed.subject, "details" in viewed.body) == ("With body", True)


def test_custom_extended_property_round_trips_and_is_searchable(ews, ext_props):
    room = ews.room(ROOM)
    start = day_at(9, 9)
    first = appointment(room, "Panel A", start, start + dt.timedelta(minutes=30), gateway_booking_id="bk-1")
    appointment(room, "Panel B", start + dt.timedelta(hours=1), start + dt.timedelta(hours=2),
                gateway_booking_id="bk-2")
    appointment(room, "Unstamped", start + dt.timedelta(hours=3), start + dt.timedelta(hours=4))

    assert room.calendar.get(id=first.id).gateway_booking_id == "bk-1"
    assert [i.subject for i in room.calendar.filter(gateway_booking_id="bk-2")] == ["Panel B"]
    assert sorted(i.subject for i in room.calendar.filter(gateway_booking_id__exists=True)) == ["Panel A", "Panel B"]

    first.gateway_booking_id = "bk-1b"
    first.save(update_fields=["gateway_booking_id"])
    assert room.calendar.get(id=first.id).gateway_booking_id == "bk-1b"
    assert [i.subject for i in room.calendar.filter(gateway_booking_id="bk-1b")] == ["Panel A"]
    assert list(room.calendar.filter(gateway_booking_id="bk-1")) == []


# -- access ---------------------------------------------------------------------------------------------------
def test_items_of_another_mailbox_need_rights(ews):
    bob = ews.organizer(BOB)
    start = day_at(10, 9)
    bobs = appointment(bob, "Bob's", start, start + dt.timedelta(hours=1))

    # Alice, logged on as herself, has no rights on Bob's mailbox.
    alice = ews.user(ALICE)
    with pytest.raises(ErrorAccessDenied):
        list(alice.fetch(ids=[(bobs.id, bobs.changekey)]))
    as_bob = Account(BOB, config=alice.protocol.config, access_type=DELEGATE, autodiscover=False,
                     default_timezone=TZ)
    with pytest.raises(ErrorAccessDenied):
        list(as_bob.calendar.view(start=start, end=start + dt.timedelta(hours=1)))

    # The rooms-scoped service account may not impersonate a person ...
    with pytest.raises(ErrorImpersonateUserDenied):
        list(ews.room(BOB).calendar.view(start=start, end=start + dt.timedelta(hours=1)))
    # ... nor reach a person's item by id while impersonating a room.
    with pytest.raises(ErrorAccessDenied):
        list(ews.room(ROOM).fetch(ids=[(bobs.id, bobs.changekey)]))
    # Bob's own view is untouched.
    assert [i.subject for i in bob.calendar.all()] == ["Bob's"]
