"""The people sync: the organisation's people, read from its directory, relayed as events (a person created,
updated, disabled, removed) through the outbox, exactly once each.

Incremental by the directory's change position, which the sync keeps without reading it: AD's uSNChanged (every
write raises it) and the DC it counts on, or Graph's deltaLink (gateway/sources/graph/people.py). With a periodic
full comparison that also finds the people who are gone (a deleted object leaves no trace a plain search sees) or
who left the configured scope. A change to the groups that define the scope (AD: a membership change bumps the
group's uSNChanged, not the person's) makes the next read a full one, when the directory can tell
(``scope_changed``). Where the directory lets the account list its deleted objects (AD's tombstones: administrators,
or a delegated right), an incremental sync relays the deleted at once. The counter is per domain controller: after a
failover to another DC the next sync is a full comparison. The counter is read *before* the search, so a change made
during a sync is read again by the next one; reading a person twice costs nothing, since an event goes out only when
what a person looks like from outside (after the privacy policy) changed. The snapshot, the counter and the events
are committed in one transaction (the store's ``commit_people``): a crash repeats a sync, never an event.

The plan is pure (``plan``); ``PeopleSync`` reads, plans and commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import structlog

from gateway.model import Event, EventType
from gateway.ports import OutboxEntry

log = structlog.get_logger("gateway.people")

PERSON_SCHEMA_VERSION = "1.0"
PERSON_EVENTS = {
    "created": EventType.PERSON_CREATED,
    "updated": EventType.PERSON_UPDATED,
    "disabled": EventType.PERSON_DISABLED,
    "removed": EventType.PERSON_REMOVED,
}


@dataclass(frozen=True, slots=True)
class DirectoryPerson:
    """A person as the directory keeps them; ``id`` is stable for life (AD's objectGUID)."""

    id: str
    email: str
    name: str | None = None
    upn: str | None = None
    department: str | None = None
    manager: str | None = None  # the manager's DN; the sync relays the manager's address
    enabled: bool = True
    dn: str = ""
    title: str | None = None
    phone: str | None = None
    usn: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class DirectoryRoom:
    """A room mailbox as the directory keeps it."""

    id: str
    email: str
    name: str | None = None
    capacity: int | None = None
    location: str | None = None
    room_lists: tuple[str, ...] = ()  # the DNs of the groups it is a direct member of
    usn: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class KnownPerson:
    """What the store last relayed about a person."""

    dn: str
    content_hash: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PeopleState:
    usn: int  # where the last sync read up to (the reader's Position): AD's change counter (Graph: 0) ...
    dc: str  # ... and the domain controller it counts on (Graph: the deltaLink to read from next)
    full_at: datetime | None  # the last full comparison


Position = tuple[int, str]  # where a directory's changes were read up to: opaque to the sync, kept by the store


@dataclass(frozen=True, slots=True)
class PeopleRead:
    """What a reader read: the people (everyone in scope when ``full``, else those changed), the ids of people
    deleted (or gone out of scope) since, and the position to read from next time."""

    people: list[DirectoryPerson]
    deleted: list[str]
    position: Position
    full: bool


@runtime_checkable
class ChangeReader(Protocol):
    """What the sync needs of a directory: everyone (``since`` None), or the changes since a position it gave. A
    position it can no longer read from (another DC, an expired delta token) is answered with a full read, never
    with silence."""

    async def read_changes(self, since: Position | None) -> PeopleRead: ...


class PeopleReader(Protocol):
    """A directory that counts its changes, as AD does (gateway/directory/ldap.py); ``UsnReader`` makes it a
    ChangeReader. It may also offer ``async read_deleted(since_usn) -> list[id]``: the people deleted since, so an
    incremental sync relays them without waiting for the full comparison; and ``async scope_changed(since_usn) ->
    bool``: whether what decides who is in scope (a group's membership) changed since, which makes the read a full
    one."""

    async def highest_usn(self) -> tuple[int, str]:
        """(the DC's highest committed change counter, the DC's identity)."""
        ...

    async def read_people(self, since_usn: int | None = None) -> list[DirectoryPerson]:
        """Everyone in scope (None), or those changed after ``since_usn``."""
        ...


class UsnReader:
    """A ChangeReader over a counting directory: its position is (the DC's change counter, the DC). The counter is
    read *before* the search, so a change made during a read is read again next time; after a failover to another
    DC (which counts its own) the read is a full one."""

    def __init__(self, directory: PeopleReader) -> None:
        self.directory = directory

    async def read_changes(self, since: Position | None) -> PeopleRead:
        usn, dc = await self.directory.highest_usn()
        scope_changed = getattr(self.directory, "scope_changed", None)
        if since is None or since[1] != dc or (scope_changed is not None and await scope_changed(since[0])):
            # a group's membership moved: who joined or left it, only a full read can tell
            return PeopleRead(await self.directory.read_people(None), [], (usn, dc), full=True)
        people = await self.directory.read_people(since[0])
        read_deleted = getattr(self.directory, "read_deleted", None)
        deleted = await read_deleted(since[0]) if read_deleted is not None else []
        return PeopleRead(people, list(deleted), (usn, dc), full=False)


class PeopleStore(Protocol):
    def people_state(self, stream: str) -> PeopleState | None: ...

    def people(self, stream: str) -> dict[str, KnownPerson]: ...

    def commit_people(self, stream: str, *, upserts: Sequence[tuple[str, str, str, dict[str, Any]]],
                      removes: Sequence[str], events: Sequence[Event], state: PeopleState) -> list[OutboxEntry]:
        """Snapshot rows (id, dn, hash, data), removals, outbox events and the new state, in one transaction."""
        ...


def person_data(p: DirectoryPerson, *, directory: str, manager: str | None, drop: Iterable[str] = ()) -> dict[str, Any]:
    """The published form (schemas/person.v1.json), with the fields the privacy policy drops set to null."""
    d: dict[str, Any] = {"schema_version": PERSON_SCHEMA_VERSION, "id": p.id, "directory": directory,
                         "email": p.email, "name": p.name, "upn": p.upn, "department": p.department,
                         "manager": manager, "title": p.title, "phone": p.phone, "enabled": p.enabled}
    for name in drop:
        d[name] = None
    return d


def content_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PeoplePlan:
    upserts: list[tuple[str, str, str, dict[str, Any]]]  # (id, dn, hash, data)
    removes: list[str]
    changes: list[tuple[str, str, dict[str, Any]]]  # (kind, id, data) in order


def plan(known: dict[str, KnownPerson], observed: Sequence[DirectoryPerson], *, full: bool, directory: str,
         drop: Iterable[str] = (), deleted: Iterable[str] = ()) -> PeoplePlan:
    """What to relay: a person not known is created; a known one whose published form changed is updated, or
    disabled when that is the change; a known person ``deleted`` (or, with ``full``, not observed) is removed."""
    drop = tuple(drop)
    deleted = set(deleted)
    # A manager is relayed by address when the manager is a person in scope: everyone observed (a full sync sees
    # everyone; an incremental one also knows the unchanged from before, less the deleted).
    addresses = {} if full else {k.dn.lower(): k.data.get("email") for pid, k in known.items()
                                 if k.dn and pid not in deleted}
    addresses.update({p.dn.lower(): p.email for p in observed if p.dn})
    upserts: list[tuple[str, str, str, dict[str, Any]]] = []
    changes: list[tuple[str, str, dict[str, Any]]] = []
    seen: set[str] = set()
    for p in sorted(observed, key=lambda p: (p.usn, p.id)):
        if p.id in seen:
            continue
        seen.add(p.id)
        data = person_data(p, directory=directory, manager=addresses.get((p.manager or "").lower()), drop=drop)
        digest = content_hash(data)
        before = known.get(p.id)
        if before is not None and before.content_hash == digest:
            if before.dn != p.dn:  # renamed or moved: nothing to tell, but manager references follow the DN
                upserts.append((p.id, p.dn, digest, data))
            continue
        upserts.append((p.id, p.dn, digest, data))
        if before is None:
            kind = "created"
        elif before.data.get("enabled") and not p.enabled:
            kind = "disabled"
        else:
            kind = "updated"
        changes.append((kind, p.id, data))
    removes: list[str] = []
    gone = (set(known) - seen) if full else (deleted & set(known)) - seen
    if gone:
        for pid in sorted(gone):
            removes.append(pid)
            changes.append(("removed", pid, {**known[pid].data, "reason": "removed_from_directory"}))
    return PeoplePlan(upserts, removes, changes)


def stream_of(directory: str) -> str:
    """The outbox's partition for a directory's people (the outbox orders per partition, like a room's)."""
    return f"directory:{directory}"


class PeopleSync:
    """Runs the people sync of one directory into a store."""

    def __init__(self, reader: ChangeReader | PeopleReader, store: PeopleStore, *, directory: str,
                 drop: Iterable[str] = (), full_seconds: float = 86400.0, source: str = "urn:exchange-gateway",
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 listeners: Sequence[Callable[[list[OutboxEntry]], None]] = ()) -> None:
        self.reader: ChangeReader = reader if isinstance(reader, ChangeReader) else UsnReader(reader)
        self.store = store
        self.directory = directory
        self.stream = stream_of(directory)
        self.drop = tuple(drop)
        self.full_seconds = full_seconds
        self.source = source
        self.clock = clock
        self.listeners = list(listeners)  # told of the committed events (the SSE hub)
        self.last_duration: float | None = None

    async def sync(self, *, full: bool | None = None) -> dict[str, int]:
        """One sync (full when due, or as asked); returns the count of each kind of event it relayed."""
        started = time.monotonic()
        state = await asyncio.to_thread(self.store.people_state, self.stream)
        now = self.clock()
        if full is None:
            full = (state is None or state.full_at is None
                    or (now - state.full_at).total_seconds() >= self.full_seconds)
        read = await self.reader.read_changes(None if full or state is None else (state.usn, state.dc))
        full, observed, deleted, (usn, dc) = read.full, read.people, read.deleted, read.position
        known = await asyncio.to_thread(self.store.people, self.stream)
        p = plan(known, observed, full=full, directory=self.directory, drop=self.drop, deleted=deleted)
        events = [Event(id=str(uuid.uuid4()), type=PERSON_EVENTS[kind], room=self.stream, subject=pid, time=now,
                        data=data, source=self.source) for kind, pid, data in p.changes]
        new_state = PeopleState(usn=usn, dc=dc, full_at=now if full else (state.full_at if state else None))
        entries = await asyncio.to_thread(self.store.commit_people, self.stream, upserts=p.upserts,
                                          removes=p.removes, events=events, state=new_state)
        self.last_duration = time.monotonic() - started
        counts: dict[str, int] = {}
        for kind, _, _ in p.changes:
            counts[kind] = counts.get(kind, 0) + 1
        log.info("people.synced", directory=self.directory, full=full, read=len(observed),
                 **({"usn": usn} if usn else {}), seconds=round(self.last_duration, 3), **counts)
        if entries:
            for listener in self.listeners:
                listener(entries)
        return counts
