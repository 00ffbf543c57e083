"""Realistic booking activity at a given rate, generated from a seed, acted out through the control layer.

People create single meetings and series (daily, weekly, monthly), private meetings, all-day events and
meetings with several rooms; partners from outside the organisation send requests; organizers move, extend
and cancel meetings and single occurrences; attendees and rooms decline.

The plan is a pure function of the seed, the organisation and the start date: ``Activity.steps()`` decides
every step from its own model of the meetings it made, never from what the simulator answered, so the same seed
gives the same sequence of steps even though the booking attendant's answers arrive asynchronously. A step
that finds nothing to act on (a room copy not yet accepted, an occurrence already gone) is counted as skipped.
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from gateway.simulator.calendar import GOID_HEADER, WEEKDAYS, zone

if TYPE_CHECKING:
    from gateway.simulator.control import Control

log = structlog.get_logger("gateway.simulator.activity")

TZ = "W. Europe Standard Time"
CREATE_KINDS = ("single", "series", "private", "all_day", "multi_room", "external")
WEIGHTS: dict[str, int] = {
    "single": 20, "series": 8, "private": 5, "all_day": 3, "multi_room": 6, "external": 4,
    "move": 12, "extend": 8, "modify_occurrence": 6, "cancel_occurrence": 4, "cancel": 8,
    "decline_user": 5, "decline_room": 5,
}
MAX_LIVE = 300  # above this many live meetings the activity cancels before it creates more
SUBJECTS = ("Weekly sync", "Design review", "1:1", "Customer call", "Sprint planning", "Interview",
            "Budget review", "Team lunch", "Architecture board", "Onboarding", "Retro", "All hands prep",
            "Vendor meeting", "Roadmap", "Incident review", "Training")
ALL_DAY_SUBJECTS = ("Workshop", "Offsite", "Training day", "Hackathon")
PARTNERS = ("fabrikam.example", "northwind.example", "adatum.example", "tailspin.example")


@dataclass(frozen=True)
class Step:
    """One thing a person does; ``args`` are the control layer's keyword arguments."""

    n: int
    kind: str
    uid: str
    args: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


@dataclass
class _Meeting:
    """The planner's own memory of a meeting it made (never read back from the simulator)."""

    uid: str
    organizer: str
    rooms: tuple[str, ...]
    attendees: tuple[str, ...]
    start: datetime
    end: datetime
    count: int = 0  # occurrences of a series; 0 for a single meeting
    all_day: bool = False


@dataclass
class Activity:
    control: Control
    rate: float = 0.5  # changes per second
    seed: int = 0
    epoch: int = 1  # distinguishes runs with the same seed on one simulator (UIDs stay unique)
    now: datetime | None = None  # the plan's "today"; fixed for a reproducible plan
    max_steps: int | None = None
    done: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    history: deque[tuple[int, str, str, str]] = field(default_factory=lambda: deque(maxlen=200))

    def __post_init__(self) -> None:
        directory = self.control.directory
        self.users = [mb.smtp for mb in directory.by_idx if mb.kind == "user" and mb.impersonation is None]
        self.rooms = [mb.smtp for mb in directory.by_idx if mb.kind == "room"]
        self.steps_run = 0
        self._task: asyncio.Task[Any] | None = None
        self._stopping = False

    # -- the plan ----------------------------------------------------------------------------------------
    def steps(self) -> Iterator[Step]:
        """The endless, deterministic sequence of steps for this seed, organisation and start date."""
        rng = random.Random(self.seed)
        base = (self.now or datetime.now(UTC)).astimezone(zone(TZ)).date()
        live: list[_Meeting] = []
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        n = 0
        if not self.rooms or not self.users:
            return
        while True:
            n += 1
            kind = "cancel" if len(live) >= MAX_LIVE else rng.choices(kinds, weights)[0]
            step = self._plan(rng, n, kind, base, live)
            if step is None:
                step = self._plan(rng, n, "single", base, live)
            assert step is not None
            yield step

    def _plan(self, rng: random.Random, n: int, kind: str, base: date, live: list[_Meeting]) -> Step | None:
        if kind in CREATE_KINDS:
            return self._plan_create(rng, n, kind, base, live)
        series = [m for m in live if m.count]
        if kind in ("modify_occurrence", "cancel_occurrence"):
            if not series:
                return None
            m = rng.choice(series)
            index = rng.randint(2, m.count)
            if kind == "cancel_occurrence":
                return Step(n, kind, m.uid, (("occurrence", index),))
            return Step(n, kind, m.uid, (("occurrence", index), ("values", (("subject", f"{rng.choice(SUBJECTS)} "
                                                                                      "(moved)"),)),
                                          ("shift_minutes", rng.choice((-60, -30, 30, 60, 120)))))
        if not live:
            return None
        if kind == "decline_user":
            with_people = [m for m in live if m.attendees]
            if not with_people:
                return None
            m = rng.choice(with_people)
            return Step(n, kind, m.uid, (("as_", rng.choice(m.attendees)),))
        if kind == "decline_room":
            with_rooms = [m for m in live if m.rooms]
            if not with_rooms:
                return None
            m = rng.choice(with_rooms)
            return Step(n, kind, m.uid, (("as_", rng.choice(m.rooms)),))
        m = rng.choice(live)
        if kind == "cancel":
            live.remove(m)
            return Step(n, kind, m.uid)
        if kind == "extend":
            minutes = rng.choice((15, 30, 60)) if not m.all_day else 24 * 60
            m.end += timedelta(minutes=minutes)
            return Step(n, kind, m.uid, (("minutes", minutes),))
        if kind == "move":
            length = m.end - m.start
            if m.count or m.all_day:  # a series moves within its day; an all-day event by whole days
                local = m.start.astimezone(zone(TZ))
                day = local.date() + timedelta(days=rng.randint(1, 14) if m.all_day else 0)
                start = _at(day, time(0, 0) if m.all_day else _slot(rng))
            else:
                start = _at(base + timedelta(days=rng.randint(0, 60)), _slot(rng))
            m.start, m.end = start, start + length
            return Step(n, kind, m.uid, (("start", start),))
        return None

    def _plan_create(self, rng: random.Random, n: int, kind: str, base: date, live: list[_Meeting]) -> Step:
        day = base + timedelta(days=rng.randint(0, 45))
        start = _at(day, _slot(rng))
        end = start + timedelta(minutes=rng.choice((30, 30, 60, 60, 60, 90, 120)))
        organizer = rng.choice(self.users)
        rooms = (rng.choice(self.rooms),)
        others = [u for u in self.users if u != organizer]
        attendees = tuple(rng.sample(others, k=min(len(others), rng.randint(0, 3))))
        args: dict[str, Any] = {"subject": rng.choice(SUBJECTS)}
        count = 0
        all_day = False
        if kind == "series":
            pattern = rng.choice(("weekly", "weekly", "weekly", "daily", "monthly"))
            count = rng.randint(4, 12)
            spec: dict[str, Any] = {"pattern": pattern, "count": count}
            if pattern == "weekly":
                spec["days"] = [WEEKDAYS[day.weekday()]]
                spec["interval"] = rng.choice((1, 1, 2))
            args["recurrence"] = spec
        elif kind == "private":
            args["private"] = True
            args["subject"] = rng.choice(("Doctor", "Personal", "HR conversation", "Salary review"))
        elif kind == "all_day":
            all_day = True
            args["all_day"] = True
            args["subject"] = rng.choice(ALL_DAY_SUBJECTS)
            start, end = _at(day, time(0, 0)), _at(day + timedelta(days=1), time(0, 0))
        elif kind == "multi_room" and len(self.rooms) > 1:
            rooms = tuple(rng.sample(self.rooms, k=min(len(self.rooms), rng.randint(2, 3))))
        elif kind == "external":
            partner = rng.choice(PARTNERS)
            organizer = f"{rng.choice(('jordan', 'sam', 'alex', 'kim', 'robin'))}@{partner}"
            uid = f"{uuid.UUID(int=rng.getrandbits(128))}-{self.epoch}@{partner}"
            attendees = attendees[:1]
            args.update(organizer=organizer, rooms=list(rooms), attendees=list(attendees), start=start, end=end,
                        uid=uid, tz=TZ)
            live.append(_Meeting(uid, organizer, rooms, attendees, start, end))
            return Step(n, kind, uid, tuple(sorted(args.items())))
        uid = self._outlook_uid(rng)
        args.update(organizer=organizer, rooms=list(rooms), attendees=list(attendees), start=start, end=end, uid=uid,
                    tz=TZ)
        live.append(_Meeting(uid, organizer, rooms, attendees, start, end, count, all_day))
        return Step(n, kind, uid, tuple(sorted(args.items(), key=lambda kv: kv[0])))

    def _outlook_uid(self, rng: random.Random) -> str:
        """A CleanGlobalObjectId as Outlook makes one, from the plan's random stream."""
        data = rng.randbytes(12) + struct.pack(">I", self.epoch)
        ft = 133_000_000_000_000_000 + rng.getrandbits(48)
        goid = GOID_HEADER + b"\x00" * 4 + struct.pack("<Q", ft) + b"\x00" * 8 + struct.pack("<I", len(data)) + data
        return goid.hex().upper()

    def plan(self, count: int) -> list[Step]:
        """The first ``count`` steps (for inspection and tests)."""
        out = []
        for step in self.steps():
            out.append(step)
            if len(out) >= count:
                break
        return out

    # -- acting it out ---------------------------------------------------------------------------------
    def execute(self, step: Step) -> str:
        """Carry out one step through the control layer; returns ``done``, ``skipped:<why>`` or ``failed``."""
        from gateway.simulator.control import ControlError

        ctl = self.control
        kw = step.kwargs()
        try:
            if step.kind in CREATE_KINDS:
                ctl.create_meeting(**kw)
            elif step.kind == "move":
                ctl.move(step.uid, kw["start"])
            elif step.kind == "extend":
                ctl.extend(step.uid, kw["minutes"])
            elif step.kind == "cancel":
                ctl.cancel(step.uid)
            elif step.kind == "cancel_occurrence":
                ctl.cancel(step.uid, kw["occurrence"])
            elif step.kind == "modify_occurrence":
                item = ctl.organizer_item(step.uid)
                original = ctl.occurrence_start(item, kw["occurrence"])
                exc = (item.exceptions or {}).get(original)
                start = exc.start if exc else original
                length = (exc.end - exc.start) if exc else (item.end - item.start)
                new_start = start + timedelta(minutes=kw["shift_minutes"])
                ctl.update(step.uid, {**dict(kw["values"]), "start": new_start, "end": new_start + length},
                           occurrence=kw["occurrence"])
            elif step.kind in ("decline_user", "decline_room"):
                ctl.decline(step.uid, kw["as_"])
            else:
                raise ValueError(f"unknown step kind {step.kind}")
        except ControlError as e:
            outcome = f"skipped:{e.code}"
            self.skipped[step.kind] += 1
        except Exception:
            log.exception("activity.step_failed", step=step.n, kind=step.kind, uid=step.uid)
            outcome = "failed"
            self.failed[step.kind] += 1
        else:
            outcome = "done"
            self.done[step.kind] += 1
        self.steps_run += 1
        self.history.append((step.n, step.kind, step.uid, outcome))
        log.info("activity.step", n=step.n, kind=step.kind, uid=step.uid, outcome=outcome)
        return outcome

    def start(self) -> asyncio.Task[Any]:
        """Run on the simulator's loop (call from it) until ``stop()`` or ``max_steps``."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = self.control.sim.spawn(self._run())
            log.info("activity.started", rate=self.rate, seed=self.seed)
        return self._task

    def stop(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        log.info("activity.stopped", steps=self.steps_run)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate
        due = loop.time()
        for step in self.steps():
            if self._stopping or (self.max_steps is not None and self.steps_run >= self.max_steps):
                break
            due += interval
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                due = loop.time()  # after a stall, carry on at the rate instead of bursting to catch up
            self.execute(step)

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.running, "rate": self.rate, "seed": self.seed, "steps": self.steps_run,
            "done": dict(sorted(self.done.items())), "skipped": dict(sorted(self.skipped.items())),
            "failed": dict(sorted(self.failed.items())),
            "recent": [{"n": n, "kind": k, "uid": u, "outcome": o} for n, k, u, o in list(self.history)[-20:]],
        }


def _slot(rng: random.Random) -> time:
    return time(rng.randint(8, 17), rng.choice((0, 30)))


def _at(day: date, at: time) -> datetime:
    return datetime.combine(day, at, tzinfo=zone(TZ)).astimezone(UTC)
