"""Seeded booking activity: the kinds of change people make, reproducible from the seed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from exchangelib import EWSDateTime

from gateway.simulator.activity import WEIGHTS, Activity
from gateway.simulator.control import Control
from gateway.simulator.seed import seed_bookings, standard_org
from gateway.simulator.server import Simulator, SimulatorConfig
from tests.conftest import TZ, wait_for

NOW = datetime(2030, 3, 4, 9, 0, tzinfo=UTC)


def _plan(seed: int, steps: int = 400) -> list[tuple[str, str, tuple]]:
    sim = Simulator(SimulatorConfig())
    standard_org(sim.directory, rooms=6, users=8)
    activity = Activity(Control(sim), rate=1, seed=seed, now=NOW)
    return [(s.kind, s.uid, s.args) for s in activity.plan(steps)]


def test_same_seed_gives_the_same_sequence_and_another_seed_another() -> None:
    first = _plan(seed=11)
    assert first == _plan(seed=11)
    assert first != _plan(seed=12)
    assert {kind for kind, _, _ in first} == set(WEIGHTS)


def test_activity_makes_every_kind_of_change_and_clients_can_read_the_result(sim_factory) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.01), rooms=6, users=8)
    ews.call(seed_bookings, ews.sim.directory, seed=3)
    ctl = Control.of(ews.sim)
    activity = ews.call(ctl.start_activity, 400, 5, 600)
    wait_for(lambda: not ews.call(lambda: activity.running), 30, what="the activity to run its 600 steps")
    assert ews.call(ctl.settle, 5)
    stats = ews.call(activity.stats)
    assert stats["steps"] == 600 and not stats["running"]
    assert stats["failed"] == {}
    assert set(stats["done"]) == set(WEIGHTS), stats  # every kind of change happened at least once

    decisions = ews.call(ctl.decisions, None, None, 10_000)
    outcomes = {(d["outcome"], d["reason"]) for d in decisions}
    assert ("accepted", "") in outcomes
    assert ("declined", "not_permitted") in outcomes  # organizers from outside, refused under the defaults
    assert ("declined", "conflict") in outcomes
    assert ("cancelled", "") in outcomes

    def kinds() -> dict[str, int]:
        seen = {"private": 0, "all_day": 0, "exceptions": 0, "multi_room": 0, "external": 0}
        for item in ews.sim.directory.items.values():
            if item.folder.distinguished != "calendar":
                continue
            if item.my_response == "Organizer" and item.sensitivity == "Private":
                seen["private"] += 1
            seen["all_day"] += item.all_day
            seen["exceptions"] += bool(item.exceptions or item.deleted)
            seen["multi_room"] += item.my_response == "Organizer" and len(item.resources) > 1
            seen["external"] += item.organizer is not None and item.organizer.email.endswith(".example")
        return seen

    assert all(ews.call(kinds).values())

    # What the activity left is readable by a client: every occurrence in every room, all fields.
    lo = EWSDateTime.now(TZ) - timedelta(days=2)
    for room in ("room1@contoso.com", "room4@contoso.com"):
        account = ews.room(room)
        items = list(account.calendar.view(start=lo, end=lo + timedelta(days=60)))
        assert items and all(i.subject is not None for i in items)


def test_stopping_activity_stops_it(sim_factory) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.01), rooms=2, users=3)
    ctl = Control.of(ews.sim)
    activity = ews.call(ctl.start_activity, 50, 1)
    wait_for(lambda: ews.call(lambda: activity.steps_run) >= 5, what="five steps")
    stats = ews.call(ctl.stop_activity)
    wait_for(lambda: not ews.call(lambda: activity.running), what="the activity to stop")
    assert ews.call(lambda: activity.steps_run) == stats["steps"] >= 5  # no step after the stop
