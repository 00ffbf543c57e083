"""GetServerTimeZones and GetUserAvailability against the simulator, driven by exchangelib over HTTP + NTLM."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from exchangelib import CalendarItem as XlCalendarItem
from exchangelib import EWSDateTime, EWSTimeZone
from exchangelib.errors import (
    ErrorMailboxDataArrayTooBig,
    ErrorMailRecipientNotFound,
    ErrorTimeIntervalTooBig,
    ErrorTimeZone,
)
from exchangelib.properties import (
    Email,
    FreeBusyViewOptions,
    MailboxData,
    TimeWindow,
    TimeZone,
    TimeZoneDefinition,
)
from exchangelib.services import GetUserAvailability
from lxml import etree

from gateway.simulator import timezones
from gateway.simulator.calendar import CalendarItem, Recurrence

BERLIN = EWSTimeZone("Europe/Berlin")
LA = EWSTimeZone("America/Los_Angeles")
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
ENS = "http://schemas.microsoft.com/exchange/services/2006/errors"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def add_item(ews, smtp: str, start: datetime, end: datetime, subject: str, *, free_busy: str = "Busy",
             location: str | None = None, private: bool = False, recurrence: Recurrence | None = None) -> int:
    """Put a calendar item straight into a mailbox, on the simulator's loop."""
    def put() -> int:
        d = ews.sim.directory
        mb = d.get(smtp)
        item = CalendarItem(iid=d.new_iid(), mailbox=mb, folder=mb.calendar, start=start, end=end, subject=subject,
                            tz="W. Europe Standard Time")
        item.free_busy = free_busy
        item.location = location
        item.recurrence = recurrence
        if private:
            item.sensitivity = "Private"
        d.add_item(item)
        return item.iid
    return ews.call(put)


def raw(protocol, body: str) -> tuple[int, etree._Element]:
    """POST a hand-written SOAP body over the protocol's NTLM session (for what exchangelib refuses to send)."""
    envelope = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}" xmlns:m="{MNS}" '
                f'xmlns:t="{TNS}"><s:Header><t:RequestServerVersion Version="Exchange2016"/></s:Header>'
                f"<s:Body>{body}</s:Body></s:Envelope>")
    session = protocol.get_session()
    try:
        r = session.post(protocol.service_endpoint, data=envelope.encode(),
                         headers={"Content-Type": "text/xml; charset=utf-8"}, allow_redirects=False)
    finally:
        protocol.release_session(session)
    return r.status_code, etree.fromstring(r.content)


def fault_code(root: etree._Element) -> str | None:
    return root.findtext(f".//{{{SOAP}}}Fault/detail/{{{ENS}}}ResponseCode")


# -- GetServerTimeZones ------------------------------------------------------------------------------------------
def _tzdef(protocol, tz: EWSTimeZone):
    found = list(protocol.get_timezones(timezones=[tz], return_full_timezone_data=True))
    assert len(found) == 1
    return found[0]


def test_w_europe_definition_round_trips_through_exchangelib(ews):
    protocol = ews.room().protocol
    tzdef = _tzdef(protocol, BERLIN)
    assert tzdef.id == "W. Europe Standard Time"
    assert tzdef.name == "(UTC+01:00) Amsterdam, Berlin, Bern, Rome, Stockholm, Vienna"
    assert {(p.name, p.bias_in_minutes) for p in tzdef.periods} == {("Standard", -60), ("Daylight", -120)}
    tz = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2026)
    assert tz.bias == -60
    # last Sunday of March at 02:00 into daylight (60 minutes more), last Sunday of October at 03:00 back
    d, s = tz.daylight_time, tz.standard_time
    assert (d.iso_month, d.occurrence, d.weekday, d.time, d.bias) == (3, 5, 7, dt.time(2), -60)
    assert (s.iso_month, s.occurrence, s.weekday, s.time, s.bias) == (10, 5, 7, dt.time(3), 0)


def test_pacific_has_two_eras_and_exchangelib_picks_by_year(ews):
    protocol = ews.room().protocol
    tzdef = _tzdef(protocol, LA)
    assert tzdef.id == "Pacific Standard Time"
    now = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2026)
    assert now.bias == 480
    assert (now.daylight_time.iso_month, now.daylight_time.occurrence, now.daylight_time.bias) == (3, 2, -60)
    assert (now.standard_time.iso_month, now.standard_time.occurrence) == (11, 1)
    before_2007 = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2005)
    assert (before_2007.daylight_time.iso_month, before_2007.daylight_time.occurrence) == (4, 1)
    assert (before_2007.standard_time.iso_month, before_2007.standard_time.occurrence) == (10, 5)


def test_southern_hemisphere_daylight_starts_in_october(ews):
    protocol = ews.room().protocol
    tzdef = _tzdef(protocol, EWSTimeZone("Australia/Sydney"))
    assert tzdef.id == "AUS Eastern Standard Time"
    tz = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2026)
    assert tz.bias == -600
    d, s = tz.daylight_time, tz.standard_time
    assert (d.iso_month, d.occurrence, d.weekday, d.time, d.bias) == (10, 1, 7, dt.time(2), -60)
    assert (s.iso_month, s.occurrence, s.weekday, s.time) == (4, 1, 7, dt.time(3))


def test_utc_has_a_single_period(ews):
    protocol = ews.room().protocol
    tzdef = _tzdef(protocol, EWSTimeZone("UTC"))
    assert tzdef.id == "UTC"
    assert [(p.name, p.bias_in_minutes) for p in tzdef.periods] == [("Standard", 0)]
    tz = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2026)
    # exchangelib fills in dummy zero-bias transitions for zones without DST
    assert tz.bias == 0 and tz.daylight_time.bias == 0 and tz.standard_time.bias == 0


def test_unknown_time_zone_id_is_refused(ews):
    protocol = ews.room().protocol
    with pytest.raises(ErrorTimeZone):
        list(protocol.get_timezones(timezones=[SimpleNamespace(ms_id="Mars Standard Time")]))


def test_all_time_zones_names_only(ews):
    protocol = ews.room().protocol
    found = {z.id: z for z in protocol.get_timezones()}
    assert len(found) == len(timezones.known_ids()) > 100
    assert found["Pacific Standard Time"].name == "(UTC-08:00) Pacific Time (US & Canada)"
    assert not found["Pacific Standard Time"].periods  # ReturnFullTimeZoneData=false


@pytest.mark.parametrize("ms_id", ["UTC", "W. Europe Standard Time", "Pacific Standard Time",
                                   "AUS Eastern Standard Time"])
def test_generated_rules_match_zoneinfo(ms_id):
    """The yearly rule of each era, read back as Exchange reads a t:TimeZone, gives zoneinfo's offsets."""
    zone = timezones.definition(ms_id)
    assert zone is not None
    zi = ZoneInfo(zone.iana)
    for year in (2005, 2026, 2041):
        rz = zone.serializable(year).tzinfo()
        t = utc(year, 1, 1)
        while t.year == year:
            local = t.astimezone(zi)
            ours = t.astimezone(rz)
            assert ours.replace(tzinfo=None) == local.replace(tzinfo=None), (ms_id, t)
            assert local.replace(tzinfo=None).replace(tzinfo=rz, fold=local.fold).astimezone(UTC) == t
            t += timedelta(hours=1)


@pytest.mark.parametrize("ms_id", ["Iran Standard Time", "Morocco Standard Time", "Russian Standard Time"])
def test_many_eras_parse_in_exchangelib(ms_id):
    """Zones whose rules change often get one group per era; exchangelib must pick the right one per year."""
    zone = timezones.definition(ms_id)
    assert zone is not None
    holder = etree.Element("holder")
    el = timezones.write_definition(holder, zone)
    tzdef = TimeZoneDefinition.from_xml(elem=el, account=None)
    assert len(tzdef.transitions_groups) == len(zone.eras)
    for year in range(timezones.FIRST_YEAR, timezones.LAST_YEAR + 1):
        theirs = TimeZone.from_server_timezone(tz_definition=tzdef, for_year=year)
        ours = zone.serializable(year)
        assert theirs.bias == ours.bias, (ms_id, year)
        if ours.daylight.month:
            d = theirs.daylight_time
            assert (d.iso_month, d.occurrence, d.bias) == (
                ours.daylight.month, ours.daylight.day_order, ours.daylight.bias), (ms_id, year)
        else:
            assert theirs.daylight_time.bias == 0


def test_unknown_id_has_no_definition():
    assert timezones.definition("Mars Standard Time") is None


# -- GetUserAvailability -----------------------------------------------------------------------------------------
@pytest.fixture
def busy_room(ews):
    """room1 on Tuesday 10 March 2026 (Berlin is UTC+1 that day, Los Angeles already UTC-7)."""
    add_item(ews, "room1@contoso.com", utc(2026, 3, 9, 22), utc(2026, 3, 9, 23, 30), "Late call")
    add_item(ews, "room1@contoso.com", utc(2026, 3, 9, 6), utc(2026, 3, 9, 6, 30), "Daily sync",
             recurrence=Recurrence("Daily", start_date=dt.date(2026, 3, 9), count=5))
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 8), utc(2026, 3, 10, 9), "Standup", location="HQ 1")
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 9, 30), utc(2026, 3, 10, 10), "Review",
             free_busy="Tentative")
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 12), utc(2026, 3, 10, 13), "Salary talk", private=True)
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 14), utc(2026, 3, 10, 15), "Optional", free_busy="Free")
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 16), utc(2026, 3, 10, 17), "Away", free_busy="OOF")
    return ews


EXPECTED = [  # (start, end, busy type, subject) in UTC; the free item is not reported
    (utc(2026, 3, 9, 22), utc(2026, 3, 9, 23, 30), "Busy", "Late call"),
    (utc(2026, 3, 10, 6), utc(2026, 3, 10, 6, 30), "Busy", "Daily sync"),
    (utc(2026, 3, 10, 8), utc(2026, 3, 10, 9), "Busy", "Standup"),
    (utc(2026, 3, 10, 9, 30), utc(2026, 3, 10, 10), "Tentative", "Review"),
    (utc(2026, 3, 10, 12), utc(2026, 3, 10, 13), "Busy", None),
    (utc(2026, 3, 10, 16), utc(2026, 3, 10, 17), "OOF", "Away"),
]
#            00  02  04  06  08  10  12  14  16  18  20  22   (Berlin hours)
MERGED_60 = "200000020210020003000000"


def _free_busy(protocol, accounts, start, end, **kw):
    return list(protocol.get_free_busy_info(accounts=accounts, start=start, end=end, **kw))


def test_detailed_merged_view_of_a_room(busy_room):
    room = busy_room.room("room1@contoso.com")
    start = EWSDateTime(2026, 3, 10, tzinfo=BERLIN)
    view, missing = _free_busy(room.protocol, [(room, "Room", False), ("nobody@contoso.com", "Required", False)],
                               start, start + timedelta(days=1), merged_free_busy_interval=60)
    assert view.view_type == "DetailedMerged"
    assert view.merged == MERGED_60
    got = [(e.start, e.end, e.busy_type, e.details.subject) for e in view.calendar_events]
    assert got == EXPECTED
    assert all(e.start.tzinfo == BERLIN for e in view.calendar_events)
    assert view.calendar_events[0].start.hour == 23  # written in the request's zone, starting before the window
    standup = view.calendar_events[2].details
    assert (standup.location, standup.is_recurring, standup.is_private, standup.is_meeting) == (
        "HQ 1", False, False, False)
    assert view.calendar_events[1].details.is_recurring is True
    private = view.calendar_events[4].details
    assert private.is_private is True and private.subject is None and private.location is None
    assert [(p.weekdays, p.start, p.end) for p in view.working_hours] == [([1, 2, 3, 4, 5], dt.time(8), dt.time(17))]
    assert view.working_hours_timezone.bias == -60  # W. Europe
    assert view.working_hours_timezone.daylight_time.iso_month == 3
    assert isinstance(missing, ErrorMailRecipientNotFound)
    assert "nobody@contoso.com" in str(missing)


def test_times_come_back_in_the_requests_time_zone(busy_room):
    room = busy_room.room("room1@contoso.com")
    start = EWSDateTime(2026, 3, 10, tzinfo=BERLIN).astimezone(LA)  # 2026-03-09 16:00 PDT
    (view,) = _free_busy(room.protocol, [(room, "Room", False)], start, start + timedelta(days=1),
                         merged_free_busy_interval=60)
    assert [(e.start, e.end) for e in view.calendar_events] == [(s, e) for s, e, _, _ in EXPECTED]
    first = view.calendar_events[0].start
    assert first.tzinfo == LA and first.utcoffset() == timedelta(hours=-7) and first.hour == 15
    assert view.merged == MERGED_60  # slots are absolute: the same window gives the same string


@pytest.mark.parametrize(("requested", "merged", "details"), [
    ("FreeBusy", False, False), ("FreeBusyMerged", True, False), ("Detailed", False, True),
    ("MergedOnly", True, None)])
def test_requested_views(busy_room, requested, merged, details):
    room = busy_room.room("room1@contoso.com")
    start = EWSDateTime(2026, 3, 10, tzinfo=BERLIN)
    (view,) = _free_busy(room.protocol, [(room, "Room", False)], start, start + timedelta(days=1),
                         merged_free_busy_interval=60, requested_view=requested)
    assert view.view_type == requested
    assert view.merged == (MERGED_60 if merged else None)
    if details is None:
        assert not view.calendar_events
    else:
        assert [(e.start, e.busy_type) for e in view.calendar_events] == [(s, b) for s, _, b, _ in EXPECTED]
        assert all((e.details is not None) == details for e in view.calendar_events)


def test_private_details_are_shown_to_the_owner_only(ews):
    add_item(ews, "alice@contoso.com", utc(2026, 3, 10, 12), utc(2026, 3, 10, 13), "Dentist", private=True)
    start = EWSDateTime(2026, 3, 10, tzinfo=BERLIN)
    alice, bob = ews.user("alice@contoso.com"), ews.user("bob@contoso.com")
    (own,) = _free_busy(alice.protocol, [(alice, "Required", False)], start, start + timedelta(days=1))
    (other,) = _free_busy(bob.protocol, [("alice@contoso.com", "Required", False)], start, start + timedelta(days=1))
    assert own.calendar_events[0].details.subject == "Dentist"
    assert other.calendar_events[0].details.subject is None
    assert other.calendar_events[0].details.is_private is True
    assert other.calendar_events[0].busy_type == "Busy"
    assert other.merged == "0" * 26 + "22" + "0" * 20  # 30-minute slots: 13:00-14:00 Berlin


def test_window_longer_than_42_days_is_refused(ews):
    room = ews.room("room1@contoso.com")
    start = EWSDateTime(2026, 1, 5, tzinfo=BERLIN)
    (view,) = _free_busy(room.protocol, [(room, "Room", False)], start, start + timedelta(days=42))
    assert len(view.merged) == 42 * 48  # 42 days of 30-minute slots
    with pytest.raises(ErrorTimeIntervalTooBig):
        _free_busy(room.protocol, [(room, "Room", False)], start, start + timedelta(days=42, minutes=1))


def test_more_than_100_mailboxes(ews):
    room = ews.room("room1@contoso.com")
    start = EWSDateTime(2026, 3, 10, tzinfo=BERLIN)
    end = start + timedelta(days=1)
    # exchangelib splits 101 mailboxes into two requests of at most 100 ...
    views = _free_busy(room.protocol, [("room2@contoso.com", "Room", False)] * 101, start, end)
    assert len(views) == 101 and all(v.merged == "0" * 48 for v in views)
    # ... and a client that does not is refused as a whole
    service = GetUserAvailability(protocol=room.protocol, chunk_size=101)
    tzdef = _tzdef(room.protocol, BERLIN)
    with pytest.raises(ErrorMailboxDataArrayTooBig):
        list(service.call(
            tzinfo=BERLIN,
            mailbox_data=[MailboxData(email=Email(email_address="room2@contoso.com"),
                                      attendee_type="Room", exclude_conflicts=False)] * 101,
            timezone=TimeZone.from_server_timezone(tz_definition=tzdef, for_year=2026),
            free_busy_view_options=FreeBusyViewOptions(time_window=TimeWindow(start=start, end=end),
                                                       merged_free_busy_interval=30, requested_view="FreeBusy")))


def _request(start: str, end: str, interval: int = 30, view: str = "DetailedMerged",
             address: str = "room1@contoso.com") -> str:
    pacific = ("<t:TimeZone><t:Bias>480</t:Bias>"
               "<t:StandardTime><t:Bias>0</t:Bias><t:Time>02:00:00</t:Time><t:DayOrder>1</t:DayOrder>"
               "<t:Month>11</t:Month><t:DayOfWeek>Sunday</t:DayOfWeek></t:StandardTime>"
               "<t:DaylightTime><t:Bias>-60</t:Bias><t:Time>02:00:00</t:Time><t:DayOrder>2</t:DayOrder>"
               "<t:Month>3</t:Month><t:DayOfWeek>Sunday</t:DayOfWeek></t:DaylightTime></t:TimeZone>")
    return (f"<m:GetUserAvailabilityRequest>{pacific}<m:MailboxDataArray><t:MailboxData><t:Email>"
            f"<t:Address>{address}</t:Address></t:Email><t:AttendeeType>Room</t:AttendeeType></t:MailboxData>"
            f"</m:MailboxDataArray><t:FreeBusyViewOptions><t:TimeWindow><t:StartTime>{start}</t:StartTime>"
            f"<t:EndTime>{end}</t:EndTime></t:TimeWindow>"
            f"<t:MergedFreeBusyIntervalInMinutes>{interval}</t:MergedFreeBusyIntervalInMinutes>"
            f"<t:RequestedView>{view}</t:RequestedView></t:FreeBusyViewOptions></m:GetUserAvailabilityRequest>")


def test_naive_times_are_read_and_written_in_the_request_time_zone(ews):
    add_item(ews, "room1@contoso.com", utc(2026, 3, 10, 17), utc(2026, 3, 10, 18), "Sync")
    protocol = ews.room().protocol
    status, root = raw(protocol, _request("2026-03-10T00:00:00", "2026-03-11T00:00:00", 60))
    assert status == 200
    ev = root.find(f".//{{{TNS}}}CalendarEvent")
    assert ev is not None
    # 17:00 UTC is 10:00 PDT (the rule says DST began on the second Sunday of March)
    assert (ev.findtext(f"{{{TNS}}}StartTime"), ev.findtext(f"{{{TNS}}}EndTime")) == (
        "2026-03-10T10:00:00", "2026-03-10T11:00:00")
    assert root.findtext(f".//{{{TNS}}}MergedFreeBusy") == "0" * 10 + "2" + "0" * 13


@pytest.mark.parametrize(("start", "end", "interval", "code"), [
    ("2026-03-10T10:00:00", "2026-03-10T10:00:00", 30, "ErrorInvalidTimeInterval"),
    ("2026-03-10T10:00:00", "2026-03-10T09:00:00", 30, "ErrorInvalidTimeInterval"),
    ("2026-03-10T00:00:00", "2026-03-11T00:00:00", 4, "ErrorInvalidMergedFreeBusyInterval"),
    ("2026-03-10T00:00:00", "2026-03-11T00:00:00", 1441, "ErrorInvalidMergedFreeBusyInterval"),
    ("2026-03-10T10:00:00", "2026-03-10T10:20:00", 30, "ErrorInvalidMergedFreeBusyInterval"),
    ("2026-01-01T00:00:00Z", "2026-02-12T00:00:01Z", 30, "ErrorTimeIntervalTooBig"),
])
def test_request_level_errors_are_faults(ews, start, end, interval, code):
    status, root = raw(ews.room().protocol, _request(start, end, interval))
    assert (status, fault_code(root)) == (500, code)


def test_item_created_through_exchangelib_shows_up(ews):
    room = ews.room("room2@contoso.com")
    start = EWSDateTime(2026, 3, 11, 14, tzinfo=BERLIN)
    XlCalendarItem(account=room, folder=room.calendar, subject="Walk-in", location="Annex 2", start=start,
                   end=start + timedelta(minutes=45), legacy_free_busy_status="Tentative").save()
    day = EWSDateTime(2026, 3, 11, tzinfo=BERLIN)
    (view,) = _free_busy(room.protocol, [(room, "Room", False)], day, day + timedelta(days=1),
                         merged_free_busy_interval=15)
    assert [(e.start, e.end, e.busy_type, e.details.subject, e.details.location) for e in view.calendar_events] == [
        (start, start + timedelta(minutes=45), "Tentative", "Walk-in", "Annex 2")]
    assert view.merged == "0" * 56 + "111" + "0" * 37
