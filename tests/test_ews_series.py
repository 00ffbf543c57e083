"""Recurring series a CalendarView returns unexpanded (servers that are not Exchange): the gateway expands them itself
and never publishes a series as one booking (gateway/sources/ews/series.py).

- pure: the EWS recurrence patterns and ranges as dates, and a recorded CalendarView answer holding a master
  (tests/data/ews/unexpanded-view.xml, with the master's GetItem in unexpanded-master.xml, recorded from the
  simulator with ``faults.unexpanded_series`` on) mapped to its occurrences;
- end to end: the simulator with ``faults.unexpanded_series`` on, read over HTTP + NTLM, gives the same bookings as
  the same calendar expanded by the server; a decline of one occurrence declines that occurrence only.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from structlog.testing import capture_logs

from gateway.model import Window, to_json
from gateway.simulator.calendar import Recurrence
from gateway.simulator.control import Control
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.mapping import booking_from_xml
from gateway.sources.ews.series import Pattern, SeriesExpander, Unexpandable, occurrences
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.writer import EwsWriter

TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
DATA = Path(__file__).parent / "data" / "ews"
ROOM = "room3@contoso.com"


def recurrence(pattern: str, rng: str) -> etree._Element:
    return etree.fromstring(f'<t:Recurrence xmlns:t="{TNS}">{pattern}{rng}</t:Recurrence>')


def dates(pattern: str, rng: str, n: int = 8) -> list[date]:
    out = []
    for d in Pattern.from_xml(recurrence(pattern, rng)).dates():
        out.append(d)
        if len(out) == n:
            break
    return out


def numbered(start: str, count: int) -> str:
    return (f"<t:NumberedRecurrence><t:StartDate>{start}</t:StartDate>"
            f"<t:NumberOfOccurrences>{count}</t:NumberOfOccurrences></t:NumberedRecurrence>")


# -- pure: the patterns --------------------------------------------------------------------------------------------
def test_daily_every_third_day_counts_its_occurrences():
    got = dates("<t:DailyRecurrence><t:Interval>3</t:Interval></t:DailyRecurrence>", numbered("2026-11-23+01:00", 4))
    assert got == [date(2026, 11, 23), date(2026, 11, 26), date(2026, 11, 29), date(2026, 12, 2)]


def test_weekly_every_second_week_counts_weeks_from_the_first_day_of_the_week():
    pattern = ("<t:WeeklyRecurrence><t:Interval>2</t:Interval><t:DaysOfWeek>Sunday Saturday</t:DaysOfWeek>"
               "<t:FirstDayOfWeek>Sunday</t:FirstDayOfWeek></t:WeeklyRecurrence>")
    # 2026-11-24 is a Tuesday: its week (from Sunday the 22nd) has Saturday the 28th; then two weeks on.
    assert dates(pattern, numbered("2026-11-24Z", 5)) == [date(2026, 11, 28), date(2026, 12, 6), date(2026, 12, 12),
                                                          date(2026, 12, 20), date(2026, 12, 26)]
    monday_first = pattern.replace("<t:FirstDayOfWeek>Sunday", "<t:FirstDayOfWeek>Monday")
    # With weeks from Monday, Sunday the 29th belongs to the first week.
    assert dates(monday_first, numbered("2026-11-24Z", 4)) == [date(2026, 11, 28), date(2026, 11, 29),
                                                               date(2026, 12, 12), date(2026, 12, 13)]


def test_weekdays_and_an_end_date_range():
    pattern = ("<t:WeeklyRecurrence><t:Interval>1</t:Interval><t:DaysOfWeek>Weekday</t:DaysOfWeek>"
               "</t:WeeklyRecurrence>")
    rng = ("<t:EndDateRecurrence><t:StartDate>2026-11-27</t:StartDate><t:EndDate>2026-12-02</t:EndDate>"
           "</t:EndDateRecurrence>")
    assert dates(pattern, rng, 100) == [date(2026, 11, 27), date(2026, 11, 30), date(2026, 12, 1), date(2026, 12, 2)]


def test_day_31_of_every_month_falls_on_the_last_day_of_shorter_months():
    pattern = ("<t:AbsoluteMonthlyRecurrence><t:Interval>1</t:Interval><t:DayOfMonth>31</t:DayOfMonth>"
               "</t:AbsoluteMonthlyRecurrence>")
    assert dates(pattern, numbered("2027-01-01", 4)) == [date(2027, 1, 31), date(2027, 2, 28), date(2027, 3, 31),
                                                         date(2027, 4, 30)]


@pytest.mark.parametrize(("days", "index", "expected"), [
    ("Friday", "Last", [date(2026, 11, 27), date(2027, 1, 29), date(2027, 3, 26)]),
    # Months count from the range's first month, even when it has no occurrence on or after the start.
    ("Weekday", "Second", [date(2027, 1, 4), date(2027, 3, 2), date(2027, 5, 4)]),
    ("WeekendDay", "First", [date(2026, 11, 1), date(2027, 1, 2), date(2027, 3, 6)]),
    ("Day", "Last", [date(2026, 11, 30), date(2027, 1, 31), date(2027, 3, 31)]),
])
def test_relative_monthly_every_other_month(days, index, expected):
    pattern = (f"<t:RelativeMonthlyRecurrence><t:Interval>2</t:Interval><t:DaysOfWeek>{days}</t:DaysOfWeek>"
               f"<t:DayOfWeekIndex>{index}</t:DayOfWeekIndex></t:RelativeMonthlyRecurrence>")
    # The second weekday of November 2026 (Mon 2nd, Tue 3rd) lies before a start on the 4th.
    got = dates(pattern, numbered("2026-11-04" if days == "Weekday" else "2026-11-01", 3))
    assert got == expected


def test_yearly_patterns_with_no_end():
    absolute = ("<t:AbsoluteYearlyRecurrence><t:DayOfMonth>29</t:DayOfMonth><t:Month>February</t:Month>"
                "</t:AbsoluteYearlyRecurrence>")
    no_end = "<t:NoEndRecurrence><t:StartDate>2027-01-01</t:StartDate></t:NoEndRecurrence>"
    assert dates(absolute, no_end, 2) == [date(2027, 2, 28), date(2028, 2, 29)]
    relative = ("<t:RelativeYearlyRecurrence><t:DaysOfWeek>Thursday</t:DaysOfWeek>"
                "<t:DayOfWeekIndex>Fourth</t:DayOfWeekIndex><t:Month>November</t:Month></t:RelativeYearlyRecurrence>")
    assert dates(relative, no_end, 2) == [date(2027, 11, 25), date(2028, 11, 23)]


def test_a_task_regeneration_pattern_is_not_a_calendar_series():
    with pytest.raises(Unexpandable):
        Pattern.from_xml(recurrence("<t:DailyRegeneration><t:Interval>1</t:Interval></t:DailyRegeneration>",
                                    numbered("2026-11-23", 2)))
    with pytest.raises(Unexpandable):
        Pattern.from_xml(None)


# -- pure: a recorded answer -----------------------------------------------------------------------------------------
def recorded() -> tuple[list[etree._Element], etree._Element]:
    view = etree.fromstring((DATA / "unexpanded-view.xml").read_bytes())
    master = etree.fromstring((DATA / "unexpanded-master.xml").read_bytes())
    items = list(view.iter(f"{{{TNS}}}CalendarItem"))
    (detail,) = master.iter(f"{{{TNS}}}CalendarItem")
    return items, detail


def test_a_recorded_master_is_never_mapped_as_one_booking():
    items, _ = recorded()
    kinds = sorted(el.findtext(f"{{{TNS}}}CalendarItemType") for el in items)
    assert kinds == ["RecurringMaster", "Single"]
    mapped = [booking_from_xml(el, ROOM, "Europe/Berlin") for el in items]
    assert [b.series_id for b in mapped if b is not None] == [None]  # only the single meeting


def test_a_recorded_master_expands_to_its_occurrences_minus_deleted_with_exceptions_to_read():
    items, detail = recorded()
    (view,) = [el for el in items if el.findtext(f"{{{TNS}}}CalendarItemType") == "RecurringMaster"]
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    found = occurrences(view, detail, start, end, "UTC")
    bookings = [booking_from_xml(el, ROOM, "UTC") for el in found.occurrences]
    assert all(b is not None and b.series_id == b.uid for b in bookings)
    starts = [b.start for b in bookings if b is not None]
    # Weekly on Monday and Thursday at 09:30 Berlin from 2026-11-23, six occurrences: the 2nd was moved (an
    # exception, read on its own) and the 4th cancelled.
    assert starts == [datetime(2026, 11, 23, 8, 30, tzinfo=UTC), datetime(2026, 11, 30, 8, 30, tzinfo=UTC),
                      datetime(2026, 12, 7, 8, 30, tzinfo=UTC), datetime(2026, 12, 10, 8, 30, tzinfo=UTC)]
    assert [b.original_start for b in bookings if b is not None] == starts
    assert all(b is not None and b.end - b.start == timedelta(minutes=45) for b in bookings)
    assert len(found.exception_ids) == 1
    # Only what overlaps the window: from 2026-12-08 on, one occurrence and no exception.
    later = occurrences(view, detail, datetime(2026, 12, 8, tzinfo=UTC), end, "UTC")
    assert [el.findtext(f"{{{TNS}}}Start") for el in later.occurrences] == ["2026-12-10T08:30:00Z"]
    assert later.exception_ids == []


def test_the_expander_reads_masters_and_exceptions_and_drops_a_series_it_cannot_expand():
    items, detail = recorded()
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    asked: list[tuple[list[str], tuple[str, ...]]] = []

    def fetch(ids: list[str], extra: tuple[str, ...]) -> list[Any]:
        asked.append((ids, extra))
        return [detail] if extra else []  # the exception is not found any more

    out = SeriesExpander("Europe/Berlin").expand(ROOM, items, start, end, fetch)
    assert [el.findtext(f"{{{TNS}}}CalendarItemType") for el in out] == ["Single"] + ["Occurrence"] * 4
    assert [extra for _, extra in asked] == [("recurrence", "modified_occurrences", "deleted_occurrences"), ()]
    assert len(asked[1][0]) == 1  # the moved occurrence, read by its own id
    with capture_logs() as logs:
        left = SeriesExpander().expand(ROOM, items, start, end, lambda ids, extra: [])
    assert [el.findtext(f"{{{TNS}}}CalendarItemType") for el in left] == ["Single"]
    assert [e["event"] for e in logs] == ["ews.calendar_view_unexpanded", "ews.series_not_expanded"]
    assert SeriesExpander().expand(ROOM, left, start, end, fetch) is left  # no master: nothing read


# -- end to end ----------------------------------------------------------------------------------------------------
def first_day() -> datetime:
    return (datetime.now(UTC) + timedelta(days=2)).replace(hour=8, minute=30, second=0, microsecond=0)


def make_calendar(ews: Any) -> list[str]:
    """Series of every kind in the room (and a single meeting), made by Alice; some occurrences changed."""
    t0 = first_day()
    c = Control.of(ews.sim)
    # The room takes every series whole, overlapping or not, however far it reaches.
    c.set_room_settings(ROOM, {"BookingWindowInDays": 1080, "EnforceSchedulingHorizon": False,
                               "AllowConflicts": True})
    uids = []

    def meeting(start: datetime, minutes: int, rec: Any, **kw: Any) -> Any:
        item = c.create_meeting(organizer="alice@contoso.com", rooms=[ROOM], start=start.isoformat(),
                                end=(start + timedelta(minutes=minutes)).isoformat(), recurrence=rec,
                                subject=f"series {len(uids)}", **kw)
        uids.append(item.uid)
        return item

    weekly = meeting(t0, 45, {"pattern": "weekly", "days": ["Monday", "Thursday"]})  # no end: crosses DST in March
    c.move(weekly.uid, (t0 + timedelta(days=7, hours=2)).isoformat(), occurrence=2)
    c.cancel(weekly.uid, occurrence=4)
    c.move(weekly.uid, (t0 - timedelta(days=1)).isoformat(), occurrence=3)  # moved before the series' start
    meeting(t0 + timedelta(hours=1), 30, {"pattern": "daily", "interval": 3, "count": 20})
    meeting(t0 + timedelta(hours=2), 60, {"pattern": "monthly", "day_of_month": 31, "until":
                                          (t0 + timedelta(days=300)).date().isoformat()})
    meeting(t0 + timedelta(hours=3), 60, {"pattern": "relative_monthly", "days": ["Friday"], "week": "Last",
                                          "interval": 2, "count": 6})
    meeting(t0 + timedelta(hours=4), 60, {"pattern": "weekly", "days": ["Sunday", "Saturday"], "interval": 2,
                                          "first_day_of_week": "Sunday", "count": 12})
    meeting(t0 + timedelta(hours=5), 60, Recurrence(kind="RelativeMonthly", days_of_week=("Weekday",),
                                                    day_of_week_index="Second", start_date=t0.date()))
    meeting(t0 + timedelta(hours=6), 60, Recurrence(kind="AbsoluteYearly", day_of_month=29, month="February",
                                                    start_date=t0.date()))
    meeting(t0 + timedelta(hours=7), 60, Recurrence(kind="RelativeYearly", days_of_week=("Thursday",),
                                                    day_of_week_index="Fourth", month="November",
                                                    start_date=t0.date()))
    meeting(t0 + timedelta(hours=8), 60, None)  # a single meeting
    day = (t0 + timedelta(days=1)).date().isoformat()
    meeting(datetime.fromisoformat(f"{day}T00:00:00"), 24 * 60, {"pattern": "weekly", "count": 5},
            all_day=True, tz="Pacific Standard Time")  # midnight to midnight in Los Angeles
    return uids


@pytest.fixture
async def room(sim_factory):  # type: ignore[no-untyped-def]
    ews = sim_factory()
    uids = ews.call(lambda: make_calendar(ews))
    assert ews.call(lambda: Control.of(ews.sim).settle())
    source = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{ORGANIZER_ACCOUNT}",
                                   default_timezone="Europe/Berlin", max_workers=2), SERVICE_PASSWORD)
    yield ews, source, uids
    await source.close()


def window() -> Window:
    now = datetime.now(UTC)
    return Window(now - timedelta(days=7), now + timedelta(days=365))


def published(bookings: list[Any]) -> list[dict[str, Any]]:
    return sorted((to_json(b) for b in bookings), key=lambda d: (d["start"], d["uid"]))


async def test_a_server_that_returns_series_unexpanded_gives_the_same_bookings(room):
    ews, source, uids = room
    expanded = published(await source.read_window(ROOM, window()))
    assert len({b["uid"] for b in expanded}) == len(uids) and len(expanded) > 60
    ews.call(lambda: setattr(ews.sim.faults, "unexpanded_series", True))
    with capture_logs() as logs:
        mine = published(await source.read_window(ROOM, window()))
        again = published(await source.read_window(ROOM, window()))
    assert mine == expanded == again
    warned = [e for e in logs if e["event"] == "ews.calendar_view_unexpanded"]
    assert len(warned) == 1 and warned[0]["room"] == ROOM and warned[0]["log_level"] == "warning"
    # A series the server sends no occurrences for is changed and read again, as after a SyncFolderItems change.
    some = await source.read_meetings(ROOM, window(), frozenset({uids[0]}))
    assert published(some) == [b for b in expanded if b["uid"] == uids[0]]


async def test_declining_one_occurrence_of_an_unexpanded_series_declines_only_that_one(room):
    ews, source, uids = room
    ews.call(lambda: setattr(ews.sim.faults, "unexpanded_series", True))
    before = [b for b in await source.read_window(ROOM, window()) if b.uid == uids[1]]  # the daily series
    target = before[2]
    await EwsWriter(source).decline_as_room(ROOM, target.uid, target.original_start, target.start, "Closed")
    after = [b for b in await source.read_window(ROOM, window()) if b.uid == uids[1]]
    assert [b.id for b in after] == [b.id for b in before if b.id != target.id]
    state = await asyncio.to_thread(ews.call, lambda: Control.of(ews.sim).meeting_state(uids[1]))
    assert not state["cancelled"]
