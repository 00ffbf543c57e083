"""A standard simulated organisation (service accounts, people, rooms and room lists) and a year of bookings."""

from __future__ import annotations

import gc
import random
import struct
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from gateway.simulator.calendar import GOID_HEADER, WEEKDAYS, Attendee, CalendarItem, Modified, Person, Recurrence, zone
from gateway.simulator.mailboxes import CalendarProcessing, Directory, Mailbox

SERVICE_ACCOUNT = "svc-gateway"
SERVICE_PASSWORD = "Gateway-Service-1!"  # a simulator-only password, printed on start-up on purpose
ORGANIZER_ACCOUNT = "svc-organizers"  # impersonation over everyone: scenario (a) of the write semantics


@dataclass
class Org:
    service_account: str
    service_password: str
    users: list[tuple[str, str]] = field(default_factory=list)  # (email, password)
    rooms: list[str] = field(default_factory=list)
    room_lists: list[str] = field(default_factory=list)


FIRST = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
         "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yvonne"]
LAST = ["Anders", "Berg", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hansen", "Ito", "Jensen", "Khan", "Larsen",
        "Meyer", "Nowak", "Olsen", "Patel", "Quinn", "Rossi", "Schmidt", "Tanaka"]
BUILDINGS = ["HQ", "Annex"]


def standard_org(directory: Directory, *, rooms: int = 5, users: int = 5) -> Org:
    """Create a service account with ApplicationImpersonation scoped to rooms, people, rooms and room lists."""
    d = directory
    dom = d.domain
    d.add_mailbox(f"{SERVICE_ACCOUNT}@{dom}", "Gateway Service", "user", password=SERVICE_PASSWORD,
                  impersonation="rooms")
    d.add_mailbox(f"{ORGANIZER_ACCOUNT}@{dom}", "Gateway Organizer Service", "user", password=SERVICE_PASSWORD,
                  impersonation="all")
    org = Org(f"{d.netbios}\\{SERVICE_ACCOUNT}", SERVICE_PASSWORD)
    for i in range(users):
        first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
        local = f"{first.lower()}" if i < len(FIRST) else f"{first.lower()}.{last.lower()}{i}"
        password = f"Pw-{local}-1!"
        d.add_mailbox(f"{local}@{dom}", f"{first} {last}", "user", password=password)
        org.users.append((f"{local}@{dom}", password))
    per_list: dict[str, list[str]] = {}
    for i in range(rooms):
        building = BUILDINGS[i % len(BUILDINGS)]
        smtp = f"room{i + 1}@{dom}"
        mb = d.add_mailbox(smtp, f"{building} Room {i + 1}", "room", capacity=4 + (i % 5) * 4)
        mb.building, mb.floor = building, 1 + (i // len(BUILDINGS)) % 5
        org.rooms.append(smtp)
        per_list.setdefault(building, []).append(smtp)
    for building, members in per_list.items():
        smtp = f"rooms-{building.lower()}@{dom}"
        d.add_room_list(smtp, f"{building} rooms", members)
        org.room_lists.append(smtp)
    return org


def place_online(directory: Directory, org: Org, *, rooms: int = 0, users: int = 0) -> tuple[list[str], list[str]]:
    """Move the last ``rooms`` rooms and ``users`` people of ``org`` to Exchange Online (the Graph side), as a
    hybrid estate half-way through its migration; returns the (rooms, users) moved."""
    moved_rooms = org.rooms[len(org.rooms) - rooms:] if rooms > 0 else []
    moved_users = [email for email, _ in org.users[len(org.users) - users:]] if users > 0 else []
    for smtp in moved_rooms + moved_users:
        directory.get(smtp).side = "graph"
    return moved_rooms, moved_users


# -- a year of bookings ------------------------------------------------------------------------------------
SEED_TZ = "W. Europe Standard Time"
SLOTS = 48  # half hours in a day
DAY_FROM, DAY_TO = 16, 36  # bookings fall between 08:00 and 18:00 local time
MEETING_SUBJECTS = ("Weekly sync", "Design review", "1:1", "Customer call", "Sprint planning", "Interview",
                    "Budget review", "Team lunch", "Architecture board", "Onboarding", "Retro", "Roadmap",
                    "Quarterly business review", "Vendor meeting", "Hiring committee", "Training")
SERIES_SUBJECTS = ("Weekly sync", "Team stand-up", "Sprint review", "Leadership meeting", "Ops review", "Jour fixe")
PRIVATE_SUBJECTS = ("Doctor", "Personal", "HR conversation", "Salary review")
ALL_DAY_SUBJECTS = ("Workshop", "Offsite", "Training day", "Hackathon")
WALK_IN_SUBJECTS = ("Booked at the room display", "Ad-hoc meeting", "Visitor meeting")


@dataclass
class SeedStats:
    """What ``seed_bookings`` wrote."""

    rooms: int = 0
    series: int = 0
    singles: int = 0
    all_day: int = 0
    multi_room: int = 0
    private: int = 0
    appointments: int = 0  # booked directly in a room's calendar (room display, anonymous booker)
    room_copies: int = 0
    organizer_copies: int = 0
    attendee_copies: int = 0
    occurrences: int = 0  # instances the rooms' calendars hold (series occurrences + single bookings)
    modified_occurrences: int = 0
    deleted_occurrences: int = 0
    booking_window_raised: int = 0  # rooms whose BookingWindowInDays was raised to cover the seeded year

    @property
    def items(self) -> int:
        return self.room_copies + self.organizer_copies + self.attendee_copies

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        out["items"] = self.items
        return out


class _Room:
    """Occupancy of one room while seeding: weekly slots held by series, and slots held on single dates."""

    __slots__ = ("busy", "mailbox", "unknown", "weekly")

    def __init__(self, mailbox: Mailbox, person: Person) -> None:
        self.mailbox = mailbox
        self.weekly: set[int] = set()  # weekday * SLOTS + slot
        self.busy: set[int] = set()  # date ordinal * SLOTS + slot
        # How a room's copy shows its own attendance: the snapshot of the request (no answer yet). No code path
        # changes a room copy's attendees in place, so every booking of the room can share this one tuple.
        self.unknown = (Attendee(person),)

    def free(self, day: date, s0: int, s1: int) -> bool:
        wd, o = day.weekday() * SLOTS, day.toordinal() * SLOTS
        return not any((wd + s) in self.weekly or (o + s) in self.busy for s in range(s0, s1))

    def take(self, day: date, s0: int, s1: int) -> None:
        o = day.toordinal() * SLOTS
        self.busy.update(range(o + s0, o + s1))


class _Seeder:
    def __init__(self, directory: Directory, rng: random.Random, today: date, past_days: int,
                 future_days: int) -> None:
        self.d = directory
        self.rng = rng
        self.today = today
        self.first = today - timedelta(days=past_days)
        self.last = today + timedelta(days=future_days)
        self.tz = zone(SEED_TZ)
        self.stats = SeedStats()
        self.persons: dict[str, Person] = {}
        self.users = [mb for mb in directory.by_idx if mb.kind == "user" and mb.impersonation is None]

    def person(self, mb: Mailbox) -> Person:
        p = self.persons.get(mb.smtp)
        if p is None:
            p = self.persons[mb.smtp] = mb.person
        return p

    def at(self, day: date, slot: int) -> datetime:
        return datetime.combine(day, time(slot // 2, 30 * (slot % 2)), tzinfo=self.tz).astimezone(UTC)

    def goid(self, created: datetime) -> bytes:
        ft = int((created - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds() * 10_000_000)
        data = self.rng.randbytes(16)
        return GOID_HEADER + b"\x00" * 4 + struct.pack("<Q", ft) + b"\x00" * 8 + struct.pack("<I", len(data)) + data

    def workday(self, day: date) -> date:
        return day + timedelta(days=(7 - day.weekday()) % 7) if day.weekday() >= 5 else day

    # -- placing ---------------------------------------------------------------------------------------
    def series(self, room: _Room) -> None:
        rng = self.rng
        for _ in range(8):  # a few tries to find a free weekly slot
            wd = rng.randint(0, 4)
            length = rng.choice((1, 2, 2, 3))
            s0 = rng.randint(DAY_FROM, DAY_TO - length)
            keys = [wd * SLOTS + s for s in range(s0, s0 + length)]
            if any(k in room.weekly for k in keys):
                continue
            room.weekly.update(keys)
            interval = rng.choice((1, 1, 1, 2))
            begin = self.first + timedelta(days=rng.randint(0, 28))
            begin += timedelta(days=(wd - begin.weekday()) % 7)
            end = self.today + timedelta(days=rng.randint(60, (self.last - self.today).days))
            count = (end - begin).days // (7 * interval) + 1
            rec = Recurrence(kind="Weekly", interval=interval, days_of_week=(WEEKDAYS[wd],), start_date=begin,
                             end_date=end)
            tod = time(s0 // 2, 30 * (s0 % 2))
            moved: dict[datetime, tuple[datetime, datetime]] = {}
            deleted: set[datetime] = set()
            if rng.random() < 0.3:  # an occurrence or two moved to another time that day
                for _ in range(rng.randint(1, 2)):
                    j = rng.randrange(count)
                    day = begin + timedelta(weeks=j * interval)
                    ns = s0 + rng.choice((-4, -3, 3, 4))
                    if ns < DAY_FROM or ns + length > DAY_TO or not room.free(day, ns, ns + length):
                        continue
                    room.take(day, ns, ns + length)
                    original = datetime.combine(day, tod, tzinfo=self.tz).astimezone(UTC)
                    moved[original] = (self.at(day, ns), self.at(day, ns + length))
            if rng.random() < 0.3:  # and an occurrence or two cancelled (a holiday)
                for _ in range(rng.randint(1, 2)):
                    day = begin + timedelta(weeks=rng.randrange(count) * interval)
                    original = datetime.combine(day, tod, tzinfo=self.tz).astimezone(UTC)
                    if original not in moved:
                        deleted.add(original)
            self.stats.series += 1
            self.stats.occurrences += count - len(deleted)
            self.stats.modified_occurrences += len(moved)
            self.stats.deleted_occurrences += len(deleted)
            self.meeting([room], self.at(begin, s0), self.at(begin, s0 + length), rng.choice(SERIES_SUBJECTS),
                         rec=rec, moved=moved, deleted=deleted)
            return

    def single(self, room: _Room, partner: _Room | None) -> None:
        rng = self.rng
        if rng.random() < 0.25:
            day = self.first + timedelta(days=rng.randrange((self.today - self.first).days or 1))
        else:  # busier in the coming weeks than eleven months out
            day = self.today + timedelta(days=int((self.last - self.today).days * rng.random() ** 2))
        day = self.workday(day)
        if day > self.last:
            return
        roll = rng.random()
        if roll < 0.03:  # the whole day: a workshop
            if not room.free(day, 0, SLOTS):
                return
            room.take(day, 0, SLOTS)
            self.stats.all_day += 1
            self.stats.occurrences += 1
            start = datetime.combine(day, time(0, 0), tzinfo=self.tz).astimezone(UTC)
            end = datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=self.tz).astimezone(UTC)
            self.meeting([room], start, end, rng.choice(ALL_DAY_SUBJECTS), all_day=True)
            return
        length = rng.choice((1, 1, 2, 2, 2, 3, 4))
        s0 = rng.randint(DAY_FROM, DAY_TO - length)
        rooms = [room]
        if partner is not None and roll < 0.08:
            rooms.append(partner)
        if not all(r.free(day, s0, s0 + length) for r in rooms):
            return
        for r in rooms:
            r.take(day, s0, s0 + length)
        self.stats.singles += 1
        self.stats.occurrences += len(rooms)
        start, end = self.at(day, s0), self.at(day, s0 + length)
        if len(rooms) > 1:
            self.stats.multi_room += 1
        if roll > 0.94 or not self.users:
            self.appointment(room, start, end, rng.choice(WALK_IN_SUBJECTS))
        elif roll > 0.89:
            self.stats.private += 1
            self.meeting(rooms, start, end, rng.choice(PRIVATE_SUBJECTS), private=True)
        else:
            self.meeting(rooms, start, end, rng.choice(MEETING_SUBJECTS))

    # -- writing ----------------------------------------------------------------------------------------
    def meeting(self, rooms: list[_Room], start: datetime, end: datetime, subject: str, *,
                rec: Recurrence | None = None, moved: dict[datetime, tuple[datetime, datetime]] | None = None,
                deleted: set[datetime] | None = None, private: bool = False, all_day: bool = False) -> None:
        """An accepted meeting: the organizer's copy, each room's copy as its attendant wrote it, attendees'."""
        rng, d = self.rng, self.d
        organizer = rng.choice(self.users)
        org_person = self.person(organizer)
        people = [u for u in rng.sample(self.users, k=min(len(self.users), rng.randint(0, 3))) if u is not organizer]
        created = min(start, datetime.combine(self.today, time(0, 0), tzinfo=UTC)) - \
            timedelta(days=rng.randint(1, 30), minutes=rng.randint(0, 600))
        goid = self.goid(created)
        location = rooms[0].mailbox.name if len(rooms) == 1 else "; ".join(r.mailbox.name for r in rooms)
        sensitivity = "Private" if private else "Normal"

        def base(mb: Mailbox) -> CalendarItem:
            it = CalendarItem(d.new_iid(), mb, mb.calendar, start=start, end=end, subject=subject, tz=SEED_TZ,
                              goid=goid, created=created)
            it.organizer = org_person
            it.is_meeting = True
            it.location = location
            it.all_day = all_day
            it.sensitivity = sensitivity
            it.recurrence = rec
            if moved:
                it.exceptions = {o: _moved(d.new_iid(), o, s, e, created) for o, (s, e) in moved.items()}
            if deleted:
                it.deleted = set(deleted)
            return it

        org = base(organizer)
        org.my_response = "Organizer"
        org.request_sent = True
        org.required = tuple(Attendee(self.person(p), "Accept", created) for p in people)
        org.resources = tuple(Attendee(self.person(r.mailbox), "Accept", created) for r in rooms)
        d.add_item(org, notify=False)
        self.stats.organizer_copies += 1
        invited = tuple(Attendee(self.person(p)) for p in people) if people else ()
        resources = rooms[0].unknown if len(rooms) == 1 else tuple(Attendee(self.person(r.mailbox)) for r in rooms)
        for r in rooms:
            copy = base(r.mailbox)
            copy.required, copy.resources = invited, resources
            copy.my_response = "Accept"
            copy.reply_time = created
            _room_policy(copy, r.mailbox.processing or CalendarProcessing())
            d.add_item(copy, notify=False)
            self.stats.room_copies += 1
        for p in people:
            copy = base(p)
            copy.required, copy.resources = invited, resources
            copy.my_response = "Accept"
            copy.reply_time = created
            d.add_item(copy, notify=False)
            self.stats.attendee_copies += 1

    def appointment(self, room: _Room, start: datetime, end: datetime, subject: str) -> None:
        """Booked in the room's own calendar (a room display): the room is the organizer, no attendees."""
        mb = room.mailbox
        created = min(start, datetime.combine(self.today, time(0, 0), tzinfo=UTC)) - timedelta(hours=2)
        it = CalendarItem(self.d.new_iid(), mb, mb.calendar, start=start, end=end, subject=subject, tz=SEED_TZ,
                          goid=self.goid(created), created=created)
        it.organizer = self.person(mb)
        it.location = mb.name
        self.d.add_item(it, notify=False)
        self.stats.appointments += 1
        self.stats.room_copies += 1


def _moved(iid: int, original: datetime, start: datetime, end: datetime, when: datetime) -> Modified:
    exc = Modified(iid, original, start, end)
    exc.modified = when
    return exc


def _room_policy(item: CalendarItem, settings: CalendarProcessing) -> None:
    """What the booking attendant does to the copy it accepts (subject, body, private flag)."""
    from gateway.simulator.attendant import BookingAttendant  # attendant imports actions; keep seed.py light

    BookingAttendant._apply_room_policy(item, settings)


def seed_bookings(directory: Directory, *, seed: int = 0, now: datetime | None = None, past_days: int = 30,
                  future_days: int = 365, series_per_room: tuple[int, int] = (2, 6),
                  singles_per_room: tuple[int, int] = (20, 50), rooms: list[str] | None = None) -> SeedStats:
    """Fill rooms with a year of accepted bookings, fast and deterministically from ``seed``.

    What the booking attendant would have left after a year of use, written directly: weekly series (some with
    a moved or a cancelled occurrence), single meetings, a few all-day workshops, meetings holding two rooms,
    private meetings, and appointments booked at the room display. Each meeting has its organizer's copy (the
    rooms' answers recorded), each room's copy (subject replaced by the organizer's name, body and private flag
    removed, under the default settings) and its attendees' copies. No room is double-booked. Nothing is
    announced to subscriptions: seed before serving.

    Rooms whose BookingWindowInDays is shorter than ``future_days`` get it raised, as an admin who lets rooms
    be booked a year ahead would have done (otherwise the attendant would have declined those bookings).
    """
    collecting = gc.isenabled()
    gc.disable()  # a million new objects would trigger ever longer full collections; none of them is garbage
    try:
        return _seed(directory, seed, now, past_days, future_days, series_per_room, singles_per_room, rooms)
    finally:
        if collecting:
            gc.enable()


def _seed(directory: Directory, seed: int, now: datetime | None, past_days: int, future_days: int,
          series_per_room: tuple[int, int], singles_per_room: tuple[int, int], rooms: list[str] | None) -> SeedStats:
    rng = random.Random(seed)
    today = (now or datetime.now(UTC)).astimezone(zone(SEED_TZ)).date()
    seeder = _Seeder(directory, rng, today, past_days, future_days)
    wanted = {r.lower() for r in rooms} if rooms is not None else None
    targets = [mb for mb in directory.rooms() if wanted is None or mb.smtp in wanted]
    for i in range(0, len(targets), 2):  # rooms in pairs, so some meetings can hold both
        block = []
        for mb in targets[i:i + 2]:
            if mb.processing is None:
                mb.processing = CalendarProcessing()
            if mb.processing.booking_window_in_days < future_days + 1:
                mb.processing.booking_window_in_days = min(1080, future_days + 1)
                seeder.stats.booking_window_raised += 1
            block.append(_Room(mb, seeder.person(mb)))
            seeder.stats.rooms += 1
        for room in block:
            for _ in range(rng.randint(*series_per_room)):
                seeder.series(room)
        for room in block:
            partner = next((r for r in block if r is not room), None)
            for _ in range(rng.randint(*singles_per_room)):
                seeder.single(room, partner)
    return seeder.stats
