"""The room's Resource Booking Attendant, driven by exchangelib over HTTP + NTLM, setting by setting.

Every meeting is booked the way the gateway books (write path (a) of the semantics doc: a meeting in the
organizer's calendar with the room as a Resources attendee, sent with SendToAllAndSaveCopy); the room's answer
is then read back from both sides: the room's copy (impersonating the room) and the organizer's Resources
attendee. The attendant answers asynchronously, so every test waits for its decision with bounded polling.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from exchangelib import Account, CalendarItem, EWSDateTime, HTMLBody
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY, SEND_TO_NONE
from exchangelib.recurrence import DailyPattern, EndDatePattern, NoEndPattern, NumberedPattern, Recurrence

from tests.conftest import TZ, wait_decisions

ROOM = "room1@contoso.com"
ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
ALICE_NAME = "Alice Anders"


# -- helpers -------------------------------------------------------------------------------------------
def day_at(days: int, hour: int, minute: int = 0) -> EWSDateTime:
    """A wall-clock time in the test zone, ``days`` days from today."""
    base = EWSDateTime.now(TZ) + dt.timedelta(days=days)
    return base.replace(hour=hour, minute=minute, second=0, microsecond=0)


def book(account: Account, subject: str, start: EWSDateTime, end: EWSDateTime, *, rooms: tuple[str, ...] = (ROOM,),
         send: str = SEND_TO_ALL_AND_SAVE_COPY, **fields: Any) -> CalendarItem:
    item = CalendarItem(account=account, folder=account.calendar, subject=subject, start=start, end=end,
                        resources=list(rooms), **fields)
    item.save(send_meeting_invitations=send)
    return item


def set_processing(ews: Any, room: str = ROOM, **settings: Any) -> None:
    ews.call(lambda: ews.sim.directory.get(room).processing.update(settings))


def decisions(ews: Any, subject: str, room: str = ROOM) -> list[Any] | None:
    """The attendant's decisions about ``subject`` once it is idle (None while it still has work queued)."""
    return ews.decisions(subject, room)


def wait_decision(ews: Any, subject: str, room: str = ROOM) -> Any:
    return wait_decisions(ews, subject, 1, room)[-1]


def room_copies(room: Account, start: EWSDateTime, end: EWSDateTime) -> list[CalendarItem]:
    return list(room.calendar.view(start=start, end=end))


def room_copy(room: Account, organizer_item: CalendarItem) -> CalendarItem | None:
    """The room's copy of a meeting, found the way the gateway must find it: by UID, never by ItemId."""
    organizer_item.refresh()
    for item in room.calendar.all():
        if item.uid == organizer_item.uid:
            return item
    return None


def resource_response(item: CalendarItem, room: str = ROOM) -> str | None:
    item.refresh()
    for att in item.resources or []:
        if att.mailbox.email_address == room:
            return att.response_type
    return None


# -- default processing ----------------------------------------------------------------------------------
def test_default_accept_replaces_subject_strips_body_and_clears_private_flag(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(3, 10)
    item = book(alice, "Q3 review", start, start + dt.timedelta(hours=1), body=HTMLBody("<p>the numbers</p>"),
                sensitivity="Private", location="HQ Room 1")

    d = wait_decision(ews, "Q3 review")
    assert (d.outcome, d.reason) == ("accepted", "")

    copy = room_copy(room, item)
    assert copy is not None
    assert copy.subject == ALICE_NAME  # AddOrganizerToSubject + DeleteSubject: the organizer's name, not "Q3 review"
    assert copy.body is None  # DeleteComments
    assert copy.sensitivity == "Normal"  # RemovePrivateProperty
    assert copy.start == start and copy.end == start + dt.timedelta(hours=1)
    assert copy.organizer.email_address == ALICE
    assert copy.is_meeting is True
    assert copy.my_response_type == "Accept"
    assert copy.legacy_free_busy_status == "Busy"
    assert copy.type == "Single"

    # The organizer's copy keeps everything and shows the room's answer on its Resources attendee.
    item.refresh()
    assert item.subject == "Q3 review"
    assert "the numbers" in item.body
    assert item.sensitivity == "Private"
    assert item.my_response_type == "Organizer"
    assert resource_response(item) == "Accept"


def test_private_flag_kept_when_remove_private_property_is_false(ews):
    set_processing(ews, remove_private_property=False, delete_comments=False)
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(3, 11)
    item = book(alice, "Salary talk", start, start + dt.timedelta(minutes=30), sensitivity="Private",
                body=HTMLBody("<p>confidential</p>"))
    assert wait_decision(ews, "Salary talk").outcome == "accepted"
    copy = room_copy(room, item)
    assert copy is not None
    assert copy.sensitivity == "Private"
    # DeleteComments false: the body reaches the room (the impersonating account can read it: bug #14).
    assert "confidential" in copy.body
    assert copy.subject == ALICE_NAME


@pytest.mark.parametrize(("add_organizer", "delete_subject", "expected"), [
    (True, True, ALICE_NAME),
    (True, False, f"{ALICE_NAME} Budget"),
    (False, True, None),  # an empty subject: exchangelib reads the absent Subject as None
    (False, False, "Budget"),
])
def test_subject_settings(ews, add_organizer, delete_subject, expected):
    set_processing(ews, add_organizer_to_subject=add_organizer, delete_subject=delete_subject)
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(4, 9)
    item = book(alice, "Budget", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Budget").outcome == "accepted"
    copy = room_copy(room, item)
    assert copy is not None
    assert copy.subject == expected
    item.refresh()
    assert item.subject == "Budget"


# -- conflicts -------------------------------------------------------------------------------------------
def test_conflict_is_declined_and_organizer_sees_decline(ews):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(5, 10)
    first = book(bob, "Standup", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Standup").outcome == "accepted"

    second = book(alice, "Clash", start + dt.timedelta(minutes=30), start + dt.timedelta(minutes=90))
    d = wait_decision(ews, "Clash")
    assert (d.outcome, d.reason) == ("declined", "conflict")

    # Bug #6: CreateItem succeeded, yet the room is not booked. The organizer's meeting stays, room declined.
    assert resource_response(second) == "Decline"
    assert second.subject == "Clash"
    assert resource_response(first) == "Accept"
    copies = room_copies(room, start - dt.timedelta(hours=2), start + dt.timedelta(hours=3))
    assert [c.subject for c in copies] == ["Bob Anders"]
    assert room_copy(room, second) is None


def test_each_room_answers_for_itself(ews):
    room2 = "room2@contoso.com"
    alice, bob = ews.organizer(ALICE), ews.organizer(BOB)
    start = day_at(5, 11)
    book(bob, "Room 2 taken", start, start + dt.timedelta(hours=1), rooms=(room2,))
    assert wait_decision(ews, "Room 2 taken", room2).outcome == "accepted"
    item = book(alice, "Two rooms", start, start + dt.timedelta(hours=1), rooms=(ROOM, room2))
    assert wait_decision(ews, "Two rooms", ROOM).outcome == "accepted"
    assert wait_decision(ews, "Two rooms", room2).reason == "conflict"
    assert resource_response(item, ROOM) == "Accept"
    assert resource_response(item, room2) == "Decline"


def test_external_organizer_needs_process_external_meeting_messages(ews):
    from gateway.simulator.actions import Invitation
    from gateway.simulator.calendar import Attendee, Person
    from gateway.simulator.calendar import CalendarItem as StoredItem

    room = ews.room(ROOM)
    start = day_at(4, 13)
    plain_start = dt.datetime.fromtimestamp(start.timestamp(), dt.UTC)  # the simulator stores plain datetimes

    def external_request(subject: str, offset_hours: int) -> None:
        """What an invitation from outside the organisation looks like when it reaches the room's attendant."""
        mb = ews.sim.directory.get(ROOM)
        snap = StoredItem(0, mb, mb.calendar, start=plain_start + dt.timedelta(hours=offset_hours),
                          end=plain_start + dt.timedelta(hours=offset_hours + 1), subject=subject)
        snap.organizer = Person("eve@fabrikam.example", "Eve External", "SMTP", "OneOff")
        snap.resources = (Attendee(mb.person),)
        snap.is_meeting = True
        ews.sim.calendars.deliver(mb, Invitation("request", snap, None))

    ews.call(external_request, "From outside", 0)
    d = wait_decision(ews, "From outside")
    assert (d.outcome, d.reason) == ("declined", "not_permitted")
    assert room_copies(room, start, start + dt.timedelta(hours=3)) == []

    set_processing(ews, process_external_meeting_messages=True)
    ews.call(external_request, "Allowed from outside", 1)
    assert wait_decision(ews, "Allowed from outside").outcome == "accepted"
    [copy] = room_copies(room, start, start + dt.timedelta(hours=3))
    assert (copy.subject, copy.organizer.email_address) == ("Eve External", "eve@fabrikam.example")


def test_adjacent_meetings_do_not_conflict(ews):
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(5, 13)
    book(bob, "Before", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Before").outcome == "accepted"
    book(alice, "After", start + dt.timedelta(hours=1), start + dt.timedelta(hours=2))
    assert wait_decision(ews, "After").outcome == "accepted"
    copies = room_copies(room, start, start + dt.timedelta(hours=2))
    assert [(c.subject, c.start) for c in copies] == [
        ("Bob Anders", start), (ALICE_NAME, start + dt.timedelta(hours=1))]


def test_allow_conflicts_accepts_overlap(ews):
    set_processing(ews, allow_conflicts=True)
    alice, bob, room = ews.organizer(ALICE), ews.organizer(BOB), ews.room(ROOM)
    start = day_at(5, 15)
    book(bob, "Standup", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Standup").outcome == "accepted"
    second = book(alice, "Overlap", start + dt.timedelta(minutes=15), start + dt.timedelta(minutes=45))
    assert wait_decision(ews, "Overlap").outcome == "accepted"
    assert resource_response(second) == "Accept"
    copies = room_copies(room, start, start + dt.timedelta(hours=1))
    assert sorted(c.subject for c in copies) == [ALICE_NAME, "Bob Anders"]
    assert all(c.legacy_free_busy_status == "Busy" for c in copies)


# -- policy limits ---------------------------------------------------------------------------------------
def test_booking_window_declines_far_meetings(ews):
    set_processing(ews, booking_window_in_days=10)
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    near_start, far_start = day_at(9, 10), day_at(20, 10)
    near = book(alice, "Near", near_start, near_start + dt.timedelta(hours=1))
    far = book(alice, "Far", far_start, far_start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Near").outcome == "accepted"
    d = wait_decision(ews, "Far")
    assert (d.outcome, d.reason) == ("declined", "outside_booking_window")
    assert resource_response(near) == "Accept"
    assert resource_response(far) == "Decline"
    assert room_copy(room, far) is None


def test_default_booking_window_is_180_days(ews):
    alice = ews.organizer(ALICE)
    start = day_at(200, 10)
    item = book(alice, "Next year", start, start + dt.timedelta(hours=1))
    d = wait_decision(ews, "Next year")
    assert (d.outcome, d.reason) == ("declined", "outside_booking_window")
    assert resource_response(item) == "Decline"


def test_booking_window_zero_means_today(ews):
    set_processing(ews, booking_window_in_days=0)
    alice = ews.organizer(ALICE)
    soon = (EWSDateTime.now(TZ) + dt.timedelta(minutes=2)).replace(second=0, microsecond=0)
    if soon.date() != EWSDateTime.now(TZ).date():
        pytest.skip("too close to midnight in the room's zone")
    today = book(alice, "Today", soon, soon + dt.timedelta(minutes=30))
    tomorrow_start = day_at(1, 10)
    tomorrow = book(alice, "Tomorrow", tomorrow_start, tomorrow_start + dt.timedelta(minutes=30))
    assert wait_decision(ews, "Today").outcome == "accepted"
    d = wait_decision(ews, "Tomorrow")
    assert (d.outcome, d.reason) == ("declined", "outside_booking_window")
    assert (resource_response(today), resource_response(tomorrow)) == ("Accept", "Decline")


def _endless_daily(account: Account, subject: str, start: EWSDateTime) -> CalendarItem:
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NoEndPattern(start=start.date()))
    return book(account, subject, start, start + dt.timedelta(hours=1), recurrence=rec)


def test_endless_series_declined_under_scheduling_horizon(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    item = _endless_daily(alice, "Forever", day_at(1, 8))
    d = wait_decision(ews, "Forever")
    assert (d.outcome, d.reason) == ("declined", "outside_booking_window")
    assert resource_response(item) == "Decline"
    assert room_copy(room, item) is None


def test_endless_series_truncated_without_scheduling_horizon(ews):
    set_processing(ews, enforce_scheduling_horizon=False, booking_window_in_days=30)
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(1, 8)
    item = _endless_daily(alice, "Forever", start)
    assert wait_decision(ews, "Forever").outcome == "accepted"
    assert resource_response(item) == "Accept"
    copy = room_copy(room, item)
    assert copy is not None and copy.type == "RecurringMaster"
    # "the number of meetings is automatically reduced so meetings won't occur after the specified date"
    horizon = EWSDateTime.now(TZ) + dt.timedelta(days=30)
    assert isinstance(copy.recurrence.boundary, EndDatePattern)
    assert copy.last_occurrence is not None
    assert horizon - dt.timedelta(days=1) < copy.last_occurrence.start <= horizon
    assert copy.recurrence.boundary.end == copy.last_occurrence.start.astimezone(TZ).date()
    beyond = room_copies(room, horizon, horizon + dt.timedelta(days=30))
    assert beyond == []
    # The organizer's own series is untouched: still endless.
    item.refresh()
    assert isinstance(item.recurrence.boundary, NoEndPattern)


def test_series_starting_beyond_window_is_declined_even_without_horizon(ews):
    set_processing(ews, enforce_scheduling_horizon=False, booking_window_in_days=30)
    alice = ews.organizer(ALICE)
    start = day_at(40, 8)
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=3))
    item = book(alice, "Late series", start, start + dt.timedelta(hours=1), recurrence=rec)
    d = wait_decision(ews, "Late series")
    assert (d.outcome, d.reason) == ("declined", "outside_booking_window")
    assert resource_response(item) == "Decline"


def test_maximum_duration(ews):
    set_processing(ews, maximum_duration_in_minutes=60)
    alice = ews.organizer(ALICE)
    start = day_at(6, 9)
    ok = book(alice, "One hour", start, start + dt.timedelta(minutes=60))
    long = book(alice, "Workshop", start + dt.timedelta(hours=2), start + dt.timedelta(hours=3, minutes=30))
    assert wait_decision(ews, "One hour").outcome == "accepted"
    d = wait_decision(ews, "Workshop")
    assert (d.outcome, d.reason) == ("declined", "too_long")
    assert resource_response(ok) == "Accept"
    assert resource_response(long) == "Decline"


def test_default_maximum_duration_is_a_day(ews):
    alice = ews.organizer(ALICE)
    start = day_at(6, 9)
    item = book(alice, "Offsite", start, start + dt.timedelta(hours=25))
    d = wait_decision(ews, "Offsite")
    assert (d.outcome, d.reason) == ("declined", "too_long")
    assert resource_response(item) == "Decline"


def test_recurring_meetings_not_allowed(ews):
    set_processing(ews, allow_recurring_meetings=False)
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(2, 14)
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=3))
    series = book(alice, "Weekly sync", start, start + dt.timedelta(hours=1), recurrence=rec)
    d = wait_decision(ews, "Weekly sync")
    assert (d.outcome, d.reason) == ("declined", "recurring_not_allowed")
    assert resource_response(series) == "Decline"
    assert room_copy(room, series) is None
    # A single meeting is still fine.
    book(alice, "Single", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Single").outcome == "accepted"


def _series_with_one_conflict(ews: Any) -> tuple[CalendarItem, EWSDateTime, EWSDateTime]:
    """Bob holds the room on day 3 of Alice's 10-day daily series; Alice then books the series."""
    alice, bob = ews.organizer(ALICE), ews.organizer(BOB)
    start = day_at(2, 16)
    clash = start + dt.timedelta(days=2)
    book(bob, "Blocker", clash, clash + dt.timedelta(hours=1))
    assert wait_decision(ews, "Blocker").outcome == "accepted"
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=10))
    series = book(alice, "Daily", start, start + dt.timedelta(hours=1), recurrence=rec)
    return series, start, clash


def test_conflicting_series_declined_by_default(ews):
    series, _start, _clash = _series_with_one_conflict(ews)
    d = wait_decision(ews, "Daily")
    assert (d.outcome, d.reason) == ("declined", "conflict")
    assert resource_response(series) == "Decline"


def test_conflict_allowances_accept_series_and_decline_conflicting_instance(ews):
    set_processing(ews, conflict_percentage_allowed=25, maximum_conflict_instances=2)
    room = ews.room(ROOM)
    series, start, clash = _series_with_one_conflict(ews)
    d = wait_decision(ews, "Daily")
    assert (d.outcome, d.reason, d.declined_instances) == ("accepted", "", 1)
    assert resource_response(series) == "Accept"

    copy = room_copy(room, series)
    assert copy is not None and copy.type == "RecurringMaster"
    assert [o.start for o in copy.deleted_occurrences or []] == [clash]
    view = room_copies(room, start - dt.timedelta(hours=1), start + dt.timedelta(days=10))
    mine = [c for c in view if c.subject == ALICE_NAME]
    assert len(mine) == 9
    assert clash not in [c.start for c in mine]
    assert [c.subject for c in view if c.start == clash] == ["Bob Anders"]


def test_conflict_allowances_are_both_limits(ews):
    # 1 conflict in 10 is within 25 %, but MaximumConflictInstances stays 0: still declined.
    set_processing(ews, conflict_percentage_allowed=25)
    series, _start, _clash = _series_with_one_conflict(ews)
    d = wait_decision(ews, "Daily")
    assert (d.outcome, d.reason) == ("declined", "conflict")
    assert resource_response(series) == "Decline"


def _accepted_daily_series(ews: Any, subject: str) -> tuple[CalendarItem, EWSDateTime]:
    alice = ews.organizer(ALICE)
    start = day_at(2, 9)
    rec = Recurrence(pattern=DailyPattern(interval=1), boundary=NumberedPattern(start=start.date(), number=5))
    series = book(alice, subject, start, start + dt.timedelta(hours=1), recurrence=rec)
    assert wait_decision(ews, subject).outcome == "accepted"
    return series, start


def test_moving_one_occurrence_into_a_conflict_declines_that_instance_only(ews):
    bob, room = ews.organizer(BOB), ews.room(ROOM)
    series, start = _accepted_daily_series(ews, "Daily")
    third = start + dt.timedelta(days=2)
    book(bob, "Lunch", third + dt.timedelta(hours=4), third + dt.timedelta(hours=5))
    assert wait_decision(ews, "Lunch").outcome == "accepted"

    occ = series.occurrence(3)
    occ.refresh()
    occ.start, occ.end = third + dt.timedelta(hours=4), third + dt.timedelta(hours=5)
    occ.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    d = wait_decisions(ews, "Daily", 2)[-1]
    assert (d.outcome, d.reason, d.declined_instances) == ("declined", "conflict", 1)

    copy = room_copy(room, series)
    assert copy is not None
    assert [o.start for o in copy.deleted_occurrences or []] == [third]
    view = room_copies(room, start - dt.timedelta(hours=1), start + dt.timedelta(days=5))
    assert [(c.subject, c.start) for c in view if c.subject == ALICE_NAME] == [
        (ALICE_NAME, start + dt.timedelta(days=n)) for n in (0, 1, 3, 4)]
    assert [c.subject for c in view if c.start == third + dt.timedelta(hours=4)] == ["Bob Anders"]
    # The series as a whole stays accepted.
    assert resource_response(series) == "Accept"


def test_moving_one_occurrence_to_a_free_slot_is_accepted_as_an_exception(ews):
    room = ews.room(ROOM)
    series, start = _accepted_daily_series(ews, "Daily")
    second = start + dt.timedelta(days=1)
    occ = series.occurrence(2)
    occ.refresh()
    occ.start, occ.end = second + dt.timedelta(hours=2), second + dt.timedelta(hours=3)
    occ.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decisions(ews, "Daily", 2)[-1].outcome == "accepted"
    copy = room_copy(room, series)
    assert copy is not None
    [modified] = copy.modified_occurrences
    assert (modified.original_start, modified.start) == (second, second + dt.timedelta(hours=2))
    view = room_copies(room, second, second + dt.timedelta(days=1, hours=1))
    assert [(c.type, c.subject, c.start) for c in view] == [
        ("Exception", ALICE_NAME, second + dt.timedelta(hours=2)),
        ("Occurrence", ALICE_NAME, second + dt.timedelta(days=1)),
    ]


def test_organizer_cancelling_one_occurrence_updates_the_room_master(ews):
    room = ews.room(ROOM)
    series, start = _accepted_daily_series(ews, "Daily")
    series.occurrence(4).delete(send_meeting_cancellations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decisions(ews, "Daily", 2)[-1].outcome == "cancelled"
    # Bug #16: no Delete of the room's item; its master now lists the cancelled instance.
    copy = room_copy(room, series)
    assert copy is not None and copy.type == "RecurringMaster"
    assert [o.start for o in copy.deleted_occurrences or []] == [start + dt.timedelta(days=3)]
    view = room_copies(room, start, start + dt.timedelta(days=5))
    assert len(view) == 4


def test_room_declining_one_occurrence_frees_that_instance(ews):
    room = ews.room(ROOM)
    series, start = _accepted_daily_series(ews, "Daily")
    fifth = start + dt.timedelta(days=4)
    [occ] = room_copies(room, fifth, fifth + dt.timedelta(hours=1))
    assert occ.type == "Occurrence"
    occ.decline()
    copy = room_copy(room, series)
    assert copy is not None
    assert [o.start for o in copy.deleted_occurrences or []] == [fifth]
    assert room_copies(room, fifth, fifth + dt.timedelta(hours=1)) == []
    assert len(room_copies(room, start, fifth)) == 4
    # The series as a whole stays accepted by the room.
    assert resource_response(series) == "Accept"


# -- AutomateProcessing ----------------------------------------------------------------------------------
def test_auto_update_places_tentatively_and_leaves_it_undecided(ews):
    set_processing(ews, automate_processing="AutoUpdate")
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(3, 15)
    item = book(alice, "Pending", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Pending").outcome == "tentative"
    copy = room_copy(room, item)
    assert copy is not None
    assert copy.legacy_free_busy_status == "Tentative"
    assert copy.my_response_type == "NoResponseReceived"
    # Only the Calendar Attendant ran: no RBA policy applied and no answer went back to the organizer.
    assert copy.subject == "Pending"
    assert resource_response(item) == "Unknown"


def test_automate_processing_none_does_nothing(ews):
    set_processing(ews, automate_processing="None")
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(3, 16)
    item = book(alice, "Unattended", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Unattended").outcome == "ignored"
    assert room_copy(room, item) is None
    assert room_copies(room, start, start + dt.timedelta(hours=1)) == []
    assert resource_response(item) == "Unknown"


# -- paths that bypass the attendant ---------------------------------------------------------------------
def test_direct_room_appointments_are_not_conflict_checked(ews):
    room = ews.room(ROOM)
    start = day_at(7, 10)
    for subject in ("Walk-in A", "Walk-in B"):
        CalendarItem(account=room, folder=room.calendar, subject=subject, start=start,
                     end=start + dt.timedelta(hours=1), legacy_free_busy_status="Busy").save()
    copies = room_copies(room, start, start + dt.timedelta(hours=1))
    # Bug #7: EWS happily double-books the room.
    assert sorted(c.subject for c in copies) == ["Walk-in A", "Walk-in B"]
    for c in copies:
        assert c.is_meeting is False
        assert c.organizer.email_address == ROOM
        assert c.my_response_type == "Organizer"
        assert c.required_attendees is None and c.resources is None
    assert ews.call(lambda: [d for d in ews.sim.attendant.decisions if d.room == ROOM]) == []

    # The attendant does see them as busy when a real request comes in.
    alice = ews.organizer(ALICE)
    item = book(alice, "Too late", start + dt.timedelta(minutes=30), start + dt.timedelta(minutes=60))
    assert (wait_decision(ews, "Too late").reason) == "conflict"
    assert resource_response(item) == "Decline"


def test_send_to_none_never_reaches_the_room(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(8, 10)
    silent = book(alice, "Silent", start, start + dt.timedelta(hours=1), send=SEND_TO_NONE)
    # A later request to the same room is the barrier: once it is decided, the first one would have been too.
    book(alice, "Barrier", start + dt.timedelta(hours=3), start + dt.timedelta(hours=4))
    assert wait_decision(ews, "Barrier").outcome == "accepted"
    assert decisions(ews, "Silent") == []
    # Bug #5: the organizer's calendar has the meeting, the room never heard of it.
    silent.refresh()
    assert silent.is_meeting is True
    assert silent.meeting_request_was_sent is False
    assert resource_response(silent) == "Unknown"
    assert room_copy(room, silent) is None
    assert [c.subject for c in room_copies(room, start, start + dt.timedelta(hours=1))] == []


def test_update_saved_with_send_to_none_leaves_the_room_at_the_old_time(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(8, 13)
    item = book(alice, "Moved quietly", start, start + dt.timedelta(hours=1))
    assert wait_decision(ews, "Moved quietly").outcome == "accepted"
    item.refresh()
    item.start, item.end = start + dt.timedelta(hours=2), start + dt.timedelta(hours=3)
    item.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_NONE)
    book(alice, "Barrier", start + dt.timedelta(hours=5), start + dt.timedelta(hours=6))
    assert wait_decision(ews, "Barrier").outcome == "accepted"
    assert len(decisions(ews, "Moved quietly") or []) == 1
    copy = room_copy(room, item)
    assert copy is not None
    assert (copy.start, copy.end) == (start, start + dt.timedelta(hours=1))  # the room still holds the old slot
    assert item.start == start + dt.timedelta(hours=2)


def test_adding_and_removing_the_room_later(ews):
    alice, room = ews.organizer(ALICE), ews.room(ROOM)
    start = day_at(9, 15)
    item = CalendarItem(account=alice, folder=alice.calendar, subject="Room later", start=start,
                        end=start + dt.timedelta(hours=1), required_attendees=[BOB])
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    item.refresh()
    item.resources = [ROOM]
    item.save(update_fields=["resources"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decision(ews, "Room later").outcome == "accepted"
    assert resource_response(item) == "Accept"
    assert room_copy(room, item) is not None

    item.resources = None
    item.save(update_fields=["resources"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    assert wait_decisions(ews, "Room later", 2)[-1].outcome == "cancelled"
    assert room_copy(room, item) is None
    item.refresh()
    assert item.resources is None
    assert [a.mailbox.email_address for a in item.required_attendees] == [BOB]
