"""The Store port on one SQLite file: rooms, sync states, the booking snapshot and the outbox.

Threading: sqlite3 is synchronous. All writes go through one writer connection behind a lock (the sync
coordinator calls from its dedicated writer thread; an ack from another thread simply waits its turn). Reads
borrow a connection from a small pool, one thread at a time, so HTTP handlers in other threads never share a
connection with the writer; in WAL mode they read the last committed state without blocking it.

Transactions: every write is ``BEGIN IMMEDIATE`` ... ``COMMIT`` (the write lock is taken up front, so a write
never fails half-way with SQLITE_BUSY), rolled back on any exception. ``commit_sync`` applies a whole sync step,
outbox events included, in one such transaction (design.md 2).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, NotFound, PreconditionFailed, ProtocolError, TransientError
from gateway.model import Booking, Event, EventType, Room, Window, cloudevent_json, from_json, utc_text
from gateway.ports import OutboxEntry, OutboxText
from gateway.security import permissions
from gateway.store import migrations
from gateway.sync.engine import Known
from gateway.sync.people import KnownPerson, PeopleState

BUSY_TIMEOUT_MS = 10_000
IDLE_READERS = 8  # reader connections kept open between uses; more are opened (and closed) on demand
SYNCHRONOUS = ("NORMAL", "FULL")
# A new file's page size. A booking is two rows of about 1 KB (its snapshot row and its event): with SQLite's
# default 4 KB pages a commit wrote (and a checkpoint copied) a WAL frame every few rows; 16 KB pages cut an import's
# commit CPU by a sixth.
PAGE_SIZE = 16384
PATH_SETTING = "store.path"  # named in the remedy when the file cannot be created or written


def _ts(value: datetime) -> str:
    """Fixed-width UTC text whose lexical order is time order."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True, slots=True)
class _Step:
    """One sync step, its rows made (SqliteStore._prepare)."""

    room: str
    now: datetime
    created_at: str
    booking_rows: list[tuple[Any, ...]]
    event_rows: list[tuple[Event, str]]
    deletes: Sequence[str]
    confirmed: Sequence[str]
    confirmed_at: str
    confirmed_window: tuple[str, str] | None  # (start, end) as _ts writes them
    item_uids: dict[str, str] | None
    removed_items: frozenset[str]
    sync_state: str | None
    clear_sync_state: bool
    room_row: Room | None


def _ts_of(value: datetime) -> str:
    """_ts of a booking's time, from its published text (to the second, kept by the model for the few times meetings
    share) when that says it all: a UTC time on the second (as Exchange's are)."""
    if value.tzinfo is UTC and not value.microsecond:
        return f"{utc_text(value)[:19]}.000000Z"
    return _ts(value)


class _Stamps:
    """_ts of the last time asked, remembered: a step's rows share a few times, each formatted once."""

    __slots__ = ("at", "text")

    def __init__(self) -> None:
        self.at: datetime | None = None
        self.text = ""

    def __call__(self, value: datetime) -> str:
        if value is not self.at:
            self.at, self.text = value, _ts(value)
        return self.text


Mark = tuple[str, str, str] | None  # a room's last complete read: window start, window end, confirmed_at (_ts texts)


def _freshness(confirmed_at: str | None, start_utc: str, end_utc: str, mark: Mark) -> str | None:
    """A booking's confirmed_at: its own, or its room's last complete read of a window it overlaps if that was later
    (the texts are fixed-width UTC: their order is time order)."""
    if mark is not None and start_utc < mark[1] and end_utc > mark[0] \
            and (confirmed_at is None or mark[2] > confirmed_at):
        return mark[2]
    return confirmed_at


def _mark(conn: sqlite3.Connection, room: str) -> Mark:
    row = conn.execute("SELECT window_start, window_end, confirmed_at FROM room_confirmations WHERE room = ?",
                       (room,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value)  # (Python 3.11 reads the Z itself)


def _second(value: str) -> datetime:
    """A stored time to the second, as bookings are published (and decoded from what was published)."""
    t = datetime.fromisoformat(value)
    return t.replace(microsecond=0) if t.microsecond else t


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """sqlite3 exceptions become the gateway's error tree at this boundary."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        raise PreconditionFailed(f"store constraint violated: {e}", key="store_conflict") from e
    except sqlite3.OperationalError as e:
        text = str(e).lower()
        if "locked" in text or "busy" in text:
            raise TransientError(f"store busy: {e}", key="store_busy",
                                 remedy="another process holds the database; retried automatically") from e
        if "disk" in text or "full" in text or "i/o" in text or "readonly" in text:
            raise TransientError(f"store cannot write: {e}", key="store_unavailable",
                                 remedy="check free space and permissions on the gateway's data volume") from e
        raise
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.ProgrammingError | sqlite3.InterfaceError):
            raise
        raise ConfigError(f"store database unusable: {e}", key="store_corrupt",
                          remedy="restore the database file from a backup, or move it aside to start empty "
                                 "(every room then resyncs from Exchange)") from e


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, its lock taken up front (BEGIN IMMEDIATE); rolled back on any failure."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            conn.execute("ROLLBACK")
        raise


class SqliteStore:
    """The gateway's durable state in one SQLite file (WAL mode).

    Durability: ``synchronous=NORMAL`` in WAL mode means a commit is in the operating system's hands before
    ``commit_sync`` returns, so a crashed or killed process loses nothing it committed. Only a power loss or
    kernel crash can lose the last few commits; the file is never corrupted either way. Pass
    ``synchronous="FULL"`` to fsync every commit and survive power loss too, at some throughput cost.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL",
                 clock: Callable[[], datetime] | None = None, sequence_from_clock: bool = False) -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            raise ConfigError(f"unknown synchronous mode {synchronous!r}", remedy=f"use one of {SYNCHRONOUS}")
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._now = clock or (lambda: datetime.now(UTC))
        # One of several replicas: a room's first sequence here is the wall clock in microseconds, above any a
        # previous owner handed out (it started earlier, and emits far fewer than one event per microsecond), so a
        # room's sequence keeps rising across a change of owner (docs/relay-protocol.md §7).
        self._first_seq: Callable[[], int] = (lambda: time.time_ns() // 1000) if sequence_from_clock else (lambda: 0)
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        files = permissions.sqlite_files(self.path)
        existed = self.path.exists()
        permissions.make_private_dir(self.path.parent, setting=PATH_SETTING)
        # Private from the first byte: the database, then its -wal and -shm files (SQLite gives them its mode).
        with _mapped_errors(), permissions.private_umask(), self._opening():
            self._writer = self._connect()
            try:
                if not existed:  # (an existing file keeps its pages: in WAL mode their size is fixed)
                    self._writer.execute(f"PRAGMA page_size={PAGE_SIZE}")
                mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigError(f"{self.path}: SQLite cannot use WAL mode here (got {mode!r})",
                                      remedy="put the database on a local file system volume")
                # NORMAL is safe against process crashes in WAL mode (see the class docstring).
                self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
                self._writer.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL after checkpoints
                self._migrate()
                self._check_writable()
            except BaseException:
                self._writer.close()
                raise
        if existed:
            permissions.warn_if_loose((*files, self.path.parent), "store.permissions_too_open")
        else:
            permissions.make_private(files)

    def _check_writable(self) -> None:
        """A database file the gateway may read but not write opens read-only without a word: fail at start-up
        rather than at the first sync. Rewriting the schema version is a write that changes nothing."""
        with _immediate(self._writer) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version={int(version)}")

    @contextmanager
    def _opening(self) -> Iterator[None]:
        """A store that cannot be created or written names its path and the fix (not sqlite's bare message)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            if "unable to open" in text or "readonly" in text or "read-only" in text:
                raise permissions.unwritable(self.path, e, PATH_SETTING) from None
            raise

    # -- connections and transactions -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
        # check_same_thread=False: a connection is used by one thread at a time (lock or pool), not always the same.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, _mapped_errors():
            if self._closed:
                raise RuntimeError("the store is closed")
            with _immediate(self._writer) as conn:
                yield conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                with _mapped_errors():
                    conn = self._connect()
                    conn.execute("PRAGMA query_only=ON")
            with _mapped_errors():
                yield conn
        finally:
            if conn is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                with self._pool_lock:
                    keep = not self._closed and len(self._idle) < IDLE_READERS
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    # The package's other tables (command journal, API keys) share these connections and transactions.
    transaction = _write
    reading = _read

    def close(self) -> None:
        """Close every connection; readers still borrowed close when returned. Idempotent."""
        with self._write_lock:
            with self._pool_lock:
                if self._closed:
                    return
                self._closed = True
                idle, self._idle = self._idle, []
            for conn in idle:
                conn.close()
            self._writer.close()  # the last connection to close checkpoints and removes the WAL

    # -- schema -----------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        steps = migrations.MIGRATIONS
        for version, script in enumerate(steps, start=1):
            # The write lock is taken before the version is read: two processes never both migrate.
            with _immediate(self._writer) as conn:
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current > len(steps):
                    raise ConfigError(
                        f"{self.path} has schema version {current}, written by a newer gateway; this one knows "
                        f"versions up to {len(steps)}",
                        key="store_too_new",
                        remedy="run the gateway version that wrote it (or newer), or point the gateway at a new "
                               "data directory and let every room resync from Exchange")
                if current < version:
                    for statement in migrations.statements(script):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={version}")

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- rooms ------------------------------------------------------------------------------------------------
    def rooms(self) -> list[Room]:
        with self._read() as conn:
            rows = conn.execute("SELECT email, name, capacity, timezone, state, reason, remedy FROM rooms "
                                "ORDER BY email").fetchall()
        return [Room(*row) for row in rows]

    def room(self, email: str) -> Room | None:
        with self._read() as conn:
            row = conn.execute("SELECT email, name, capacity, timezone, state, reason, remedy FROM rooms "
                               "WHERE email = ?", (email,)).fetchone()
        return Room(*row) if row else None

    def upsert_room(self, room: Room) -> None:
        with self._write() as conn:
            self._upsert_room(conn, room)

    def _upsert_room(self, conn: sqlite3.Connection, room: Room) -> None:
        conn.execute(
            "INSERT INTO rooms (email, name, capacity, timezone, state, reason, remedy, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (email) DO UPDATE SET name = excluded.name, "
            "capacity = excluded.capacity, timezone = excluded.timezone, state = excluded.state, "
            "reason = excluded.reason, remedy = excluded.remedy, updated_at = excluded.updated_at",
            (room.email, room.name, room.capacity, room.timezone, room.state, room.reason, room.remedy,
             _ts(self._now())))

    def remove_room(self, email: str) -> None:
        """Forget a room: its sync state, snapshot and item map go with it; its outbox events stay for delivery."""
        with self._write() as conn:
            conn.execute("DELETE FROM rooms WHERE email = ?", (email,))

    # -- snapshot ---------------------------------------------------------------------------------------------
    def sync_state(self, room: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT state FROM sync_states WHERE room = ?", (room,)).fetchone()
        return None if row is None else str(row[0])

    def known(self, room: str, uids: frozenset[str] | None = None) -> dict[str, Known]:
        """What the store holds of the room: every booking, or those of the meetings ``uids``."""
        if uids is not None and not uids:
            return {}
        columns = "id, content_hash, json, confirmed_at, uid, start_utc, end_utc"
        with self._read() as conn:
            conn.execute("BEGIN")  # (the room's mark and its rows from one snapshot; _read rolls it back)
            mark = _mark(conn, room)
            if uids is None:
                rows = conn.execute(f"SELECT {columns} FROM bookings WHERE room = ?", (room,)).fetchall()
            else:
                rows = conn.execute(f"SELECT {columns} FROM bookings WHERE room = ? AND "
                                    "uid IN (SELECT value FROM json_each(?))",
                                    (room, json.dumps(sorted(uids)))).fetchall()
        # The booking is decoded only if asked for (a deletion); its times are the published ones (to the second).
        return {bid: Known(None, content_hash, uid=uid, start=_second(start), end=_second(end),
                           decode=functools.partial(_booking, doc, confirmed_at, start, end, mark))
                for bid, content_hash, doc, confirmed_at, uid, start, end in rows}

    def bookings(self, room: str, start: datetime | None = None, end: datetime | None = None) -> list[Booking]:
        """The room's bookings overlapping [start, end), by start time."""
        sql = "SELECT json, confirmed_at, start_utc, end_utc FROM bookings WHERE room = ?"
        args: list[Any] = [room]
        if end is not None:
            sql += " AND start_utc < ?"
            args.append(_ts(end))
        if start is not None:
            sql += " AND end_utc > ?"
            args.append(_ts(start))
        sql += " ORDER BY start_utc, id"
        with self._read() as conn:
            conn.execute("BEGIN")
            mark = _mark(conn, room)
            rows = conn.execute(sql, args).fetchall()
        return [_booking(doc, confirmed_at, start, end, mark) for doc, confirmed_at, start, end in rows]

    def booking(self, room: str, booking_id: str) -> Booking | None:
        """One booking of ``room`` by its id (as relayed in events), or None."""
        with self._read() as conn:
            conn.execute("BEGIN")
            row = conn.execute("SELECT json, confirmed_at, start_utc, end_utc FROM bookings WHERE room = ? AND id = ?",
                               (room, booking_id)).fetchone()
            mark = None if row is None else _mark(conn, room)
        return None if row is None else _booking(row[0], row[1], row[2], row[3], mark)

    def uids_for_items(self, room: str, item_ids: frozenset[str]) -> frozenset[str]:
        if not item_ids:
            return frozenset()
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT uid FROM item_map WHERE room = ? AND item_id IN "
                                "(SELECT value FROM json_each(?))", (room, json.dumps(sorted(item_ids)))).fetchall()
        return frozenset(row[0] for row in rows)

    # -- the sync step ----------------------------------------------------------------------------------------
    def commit_sync(self, room: str, *, upserts: Sequence[Booking], deletes: Sequence[str], events: Sequence[Event],
                    confirmed: Sequence[str] = (), confirmed_at: datetime | None = None,
                    confirmed_window: Window | None = None,
                    item_uids: dict[str, str] | None = None, removed_items: frozenset[str] = frozenset(),
                    sync_state: str | None = None, clear_sync_state: bool = False,
                    room_row: Room | None = None) -> list[OutboxEntry]:
        """Apply one sync step atomically: snapshot rows, item map, outbox events, and the new sync state;
        ``room_row``: the room's row too (a state change and its event, one transaction instead of two).
        ``confirmed_window``: the step is a complete read of this window, and every booking of the room that
        overlaps it is confirmed at ``confirmed_at`` (one row for the room: ``confirmed`` need not name them).

        Deletes apply before upserts, item removals before additions. Returns the appended outbox entries, each
        event carrying its per-room ``sequence``. Raises NotFound for a room that is not in the store (removed
        while a sync ran), and PreconditionFailed for a constraint violation such as a reused event id; either
        way nothing of the step is kept.
        """
        step = self._prepare(room, upserts=upserts, deletes=deletes, events=events, confirmed=confirmed,
                             confirmed_at=confirmed_at, confirmed_window=confirmed_window, item_uids=item_uids,
                             removed_items=removed_items,
                             sync_state=sync_state, clear_sync_state=clear_sync_state, room_row=room_row)
        with self._write() as conn:
            return self._apply(conn, step)

    def commit_syncs(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> list[list[OutboxEntry] | Exception]:
        """Several sync steps (room, commit_sync's keyword arguments) in one transaction, each atomic on its own:
        a step commit_sync would refuse (NotFound, PreconditionFailed, ValueError) leaves nothing of itself and
        the others are kept. Returns each step's entries or refusal, in order. A failure of the transaction itself
        (the disk full, the file busy) raises, and nothing of any step is kept."""
        prepared: list[_Step | Exception] = []
        for room, kw in steps:
            try:
                prepared.append(self._prepare(room, **kw))
            except ValueError as e:
                prepared.append(e)
        # Written without a savepoint a step, as a batch almost always goes through: under a savepoint SQLite first
        # copies every page a step changes (16 KB each) to a sub-journal, which made a room's state step ten times
        # dearer. A step refused rolls the whole batch back, and it is written again with a savepoint a step.
        try:
            with self._write() as conn:
                return [step if isinstance(step, Exception) else self._apply(conn, step) for step in prepared]
        except (NotFound, PreconditionFailed, ValueError):
            pass
        return self._commit_each(prepared)

    def _commit_each(self, prepared: list[_Step | Exception]) -> list[list[OutboxEntry] | Exception]:
        out: list[list[OutboxEntry] | Exception] = []
        with self._write() as conn:
            for step in prepared:
                if isinstance(step, Exception):
                    out.append(step)
                    continue
                conn.execute("SAVEPOINT step")
                try:
                    try:
                        entries = self._apply(conn, step)
                    except sqlite3.IntegrityError as e:
                        raise PreconditionFailed(f"store constraint violated: {e}", key="store_conflict") from e
                except (NotFound, PreconditionFailed, ValueError) as e:
                    conn.execute("ROLLBACK TO step")
                    conn.execute("RELEASE step")
                    out.append(e)
                    continue
                conn.execute("RELEASE step")
                out.append(entries)
        return out

    def _prepare(self, room: str, *, upserts: Sequence[Booking], deletes: Sequence[str], events: Sequence[Event],
                 confirmed: Sequence[str] = (), confirmed_at: datetime | None = None,
                 confirmed_window: Window | None = None,
                 item_uids: dict[str, str] | None = None, removed_items: frozenset[str] = frozenset(),
                 sync_state: str | None = None, clear_sync_state: bool = False,
                 room_row: Room | None = None) -> _Step:
        """A sync step's rows, made before the write lock is taken."""
        key = room.lower()
        for b in upserts:
            if b.room != room and b.room.lower() != key:
                raise ValueError(f"booking {b.id} belongs to {b.room}, not {room}")
        if room_row is not None and room_row.email.lower() != key:
            raise ValueError(f"room row {room_row.email} given for {room}")
        now = self._now()
        created_at = _ts(now)
        ts = _Stamps()  # a step's bookings share their confirmed_at, its events their time: each formatted once
        booking_rows = []
        for b in upserts:  # the row keeps the JSON text the content hash was taken of: encoded once
            booking_rows.append((room, b.id, b.uid, _ts_of(b.start), _ts_of(b.end),
                                 b.content_hash(), b.content_json(), ts(b.confirmed_at) if b.confirmed_at else None))
        window = None if confirmed_window is None else (_ts(confirmed_window.start), _ts(confirmed_window.end))
        return _Step(room, now, created_at, booking_rows, [(e, _event_text(e)) for e in events], deletes, confirmed,
                     _ts(confirmed_at or now), window, item_uids, removed_items, sync_state, clear_sync_state,
                     room_row)

    def _apply(self, conn: sqlite3.Connection, step: _Step) -> list[OutboxEntry]:
        room = step.room
        entries: list[OutboxEntry] = []
        if step.room_row is not None:
            self._upsert_room(conn, step.room_row)
        if conn.execute("SELECT 1 FROM rooms WHERE email = ?", (room,)).fetchone() is None:
            raise NotFound(f"room {room} is not in the store", key="room_not_in_store",
                           remedy="add the room (upsert_room) before syncing it")
        if step.deletes:
            conn.executemany("DELETE FROM bookings WHERE room = ? AND id = ?", [(room, bid) for bid in step.deletes])
        if step.booking_rows:
            conn.executemany(
                "INSERT INTO bookings (room, id, uid, start_utc, end_utc, content_hash, json, confirmed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (room, id) DO UPDATE SET uid = excluded.uid, "
                "start_utc = excluded.start_utc, end_utc = excluded.end_utc, "
                "content_hash = excluded.content_hash, json = excluded.json, "
                "confirmed_at = excluded.confirmed_at", step.booking_rows)
        if step.confirmed:
            conn.executemany("UPDATE bookings SET confirmed_at = ? WHERE room = ? AND id = ?",
                             [(step.confirmed_at, room, bid) for bid in step.confirmed])
        if step.confirmed_window is not None:
            start, end = step.confirmed_window
            # What the room's last mark confirmed and this one does not (the window moved on) keeps its freshness
            # in its own rows: a booking's confirmed_at never goes back.
            old = _mark(conn, room)
            if old is not None and (old[0], old[1]) != (start, end):
                conn.execute("UPDATE bookings SET confirmed_at = ? WHERE room = ? AND start_utc < ? AND end_utc > ? "
                             "AND NOT (start_utc < ? AND end_utc > ?) AND (confirmed_at IS NULL OR confirmed_at < ?)",
                             (old[2], room, old[1], old[0], end, start, old[2]))
            conn.execute("INSERT INTO room_confirmations (room, window_start, window_end, confirmed_at) "
                         "VALUES (?, ?, ?, ?) ON CONFLICT (room) DO UPDATE SET window_start = excluded.window_start, "
                         "window_end = excluded.window_end, confirmed_at = excluded.confirmed_at",
                         (room, start, end, step.confirmed_at))
        if step.removed_items:
            conn.executemany("DELETE FROM item_map WHERE room = ? AND item_id = ?",
                             [(room, item) for item in step.removed_items])
        if step.item_uids:
            conn.executemany("INSERT INTO item_map (room, item_id, uid) VALUES (?, ?, ?) "
                             "ON CONFLICT (room, item_id) DO UPDATE SET uid = excluded.uid",
                             [(room, item, uid) for item, uid in step.item_uids.items()])
        if step.event_rows:
            entries = self._append(conn, step.event_rows, step.now, step.created_at)
        if step.clear_sync_state:
            conn.execute("DELETE FROM sync_states WHERE room = ?", (room,))
        elif step.sync_state is not None:
            conn.execute("INSERT INTO sync_states (room, state, updated_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (room) DO UPDATE SET state = excluded.state, "
                         "updated_at = excluded.updated_at", (room, step.sync_state, step.created_at))
        return entries

    def _append(self, conn: sqlite3.Connection, rows: list[tuple[Event, str]], now: datetime,
                created_at: str) -> list[OutboxEntry]:
        last: dict[str, int] = {}
        for e, _ in rows:
            key = e.room.lower()
            if key not in last:
                row = conn.execute("SELECT last_seq FROM outbox_rooms WHERE room = ?", (e.room,)).fetchone()
                last[key] = row[0] if row else self._first_seq()
        # The global seqs are handed out here, in one executemany (a statement per event was a tenth of the
        # writer's time): the next after the highest ever issued, as AUTOINCREMENT would (the write lock is held).
        (seq,) = conn.execute("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), "
                              "coalesce((SELECT max(seq) FROM outbox), 0))").fetchone()
        entries: list[OutboxEntry] = []
        values = []
        ts = _Stamps()
        for e, data in rows:
            key = e.room.lower()
            last[key] += 1
            room_seq = last[key]
            seq += 1
            values.append((seq, e.room, room_seq, e.id, e.type, e.subject, e.source, ts(e.time), data, created_at))
            entries.append(OutboxEntry(seq, room_seq, e.sequenced(room_seq), now))
        conn.executemany("INSERT INTO outbox (seq, room, room_seq, event_id, type, subject, source, time, data, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        rooms = {e.room.lower(): e.room for e, _ in rows}
        conn.executemany("INSERT INTO outbox_rooms (room, last_seq) VALUES (?, ?) "
                         "ON CONFLICT (room) DO UPDATE SET last_seq = excluded.last_seq",
                         [(rooms[key], seq) for key, seq in last.items()])
        return entries

    # -- the directory's people -------------------------------------------------------------------------------
    def people_state(self, stream: str) -> PeopleState | None:
        with self._read() as conn:
            row = conn.execute("SELECT usn, dc, full_at FROM people_state WHERE stream = ?", (stream,)).fetchone()
        return None if row is None else PeopleState(int(row[0]), str(row[1]), _parse_ts(row[2]) if row[2] else None)

    def people(self, stream: str) -> dict[str, KnownPerson]:
        """What was last relayed of each person of a directory, by id."""
        with self._read() as conn:
            rows = conn.execute("SELECT id, dn, content_hash, json FROM people WHERE stream = ?", (stream,)).fetchall()
        return {pid: KnownPerson(dn, digest, json.loads(doc)) for pid, dn, digest, doc in rows}

    def commit_people(self, stream: str, *, upserts: Sequence[tuple[str, str, str, dict[str, Any]]],
                      removes: Sequence[str], events: Sequence[Event], state: PeopleState) -> list[OutboxEntry]:
        """One people sync step in one transaction: snapshot rows (id, dn, hash, data), removals, the outbox events
        (partition ``stream``) and how far the sync read."""
        now = self._now()
        created_at = _ts(now)
        rows = [(stream, pid, dn, digest, json.dumps(data, separators=(",", ":")), created_at)
                for pid, dn, digest, data in upserts]
        event_rows = [(e, _event_text(e)) for e in events]
        entries: list[OutboxEntry] = []
        with self._write() as conn:
            if removes:
                conn.executemany("DELETE FROM people WHERE stream = ? AND id = ?", [(stream, pid) for pid in removes])
            if rows:
                conn.executemany(
                    "INSERT INTO people (stream, id, dn, content_hash, json, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (stream, id) DO UPDATE SET dn = excluded.dn, content_hash = excluded.content_hash, "
                    "json = excluded.json, updated_at = excluded.updated_at", rows)
            if event_rows:
                entries = self._append(conn, event_rows, now, created_at)
            conn.execute("INSERT INTO people_state (stream, usn, dc, full_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (stream) DO UPDATE SET usn = excluded.usn, dc = excluded.dc, "
                         "full_at = excluded.full_at",
                         (stream, state.usn, state.dc, _ts(state.full_at) if state.full_at else None))
        return entries

    # -- the outbox -------------------------------------------------------------------------------------------
    def outbox_after(self, seq: int, limit: int = 500) -> list[OutboxEntry]:
        """Events with a global seq above ``seq``, in order: the resume point after a reconnect or a crash."""
        with self._read() as conn:
            rows = conn.execute("SELECT seq, room, room_seq, event_id, type, subject, source, time, data, created_at "
                                "FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [_entry(*row) for row in rows]

    def outbox_texts_after(self, seq: int, limit: int = 500) -> list[OutboxText]:
        """``outbox_after``'s events as their CloudEvent text, their data put in as stored (not decoded)."""
        with self._read() as conn:
            rows = conn.execute("SELECT seq, room, room_seq, event_id, type, subject, source, time, data "
                                "FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [OutboxText(seq, room_seq, type_, event_id,
                           cloudevent_json(event_id, type_, room, subject, time, room_seq, source, data))
                for seq, room, room_seq, event_id, type_, subject, source, time, data in rows]

    def last_seq(self) -> int:
        """The highest seq ever handed out (0 for a new store), pruned events included."""
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def acked(self) -> int:
        """The highest acknowledged seq: where delivery to the hub resumes."""
        with self._read() as conn:
            return int(conn.execute("SELECT seq FROM outbox_ack WHERE id = 1").fetchone()[0])

    def ack(self, seq: int) -> None:
        """Record that everything up to ``seq`` was delivered. Monotonic: acknowledging less is a no-op."""
        with self._write() as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            issued = row[0] if row else 0
            if seq > issued:
                # The peer is ahead of us: it acknowledges events this store never wrote (a restored backup, or
                # the last commits lost to a power cut). Recording it would silently skip the next events.
                raise ProtocolError(f"acknowledged seq {seq} was never issued (the last is {issued})",
                                    key="ack_ahead_of_outbox")
            conn.execute("UPDATE outbox_ack SET seq = MAX(seq, ?) WHERE id = 1", (seq,))

    def outbox_stats(self) -> tuple[int, datetime | None]:
        """(depth: events not yet acknowledged, time of the oldest of them)."""
        with self._read() as conn:
            depth, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM outbox WHERE seq > (SELECT seq FROM outbox_ack WHERE id = 1)"
            ).fetchone()
        return int(depth), _parse_ts(oldest) if oldest else None

    def prune(self, retain_acked_for: timedelta, *, acked_only: bool = True) -> int:
        """Delete acknowledged events older than ``retain_acked_for``; never an unacknowledged one unless
        ``acked_only`` is False (no hub will ever acknowledge them: only local SSE clients read the outbox).
        Returns the count. Local SSE consumers resuming from a pruned seq get what is left after it.
        """
        cutoff = _ts(self._now() - retain_acked_for)
        acked = "seq <= (SELECT seq FROM outbox_ack WHERE id = 1) AND " if acked_only else ""
        with self._write() as conn:
            cur = conn.execute(f"DELETE FROM outbox WHERE {acked}created_at < ?", (cutoff,))
            return cur.rowcount

    def check(self) -> list[str]:
        """``PRAGMA integrity_check`` plus foreign keys: an empty list when the file is sound (for ``doctor``)."""
        with self._read() as conn:
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
            problems += [f"foreign key: {r}" for r in conn.execute("PRAGMA foreign_key_check").fetchall()]
        return problems


def _event_text(e: Event) -> str:
    """The event's data as the outbox keeps it: the text its builder encoded, else compact JSON."""
    if e.data_json is not None:
        return e.data_json
    return json.dumps(e.data if type(e.data) is dict else dict(e.data), separators=(",", ":"))


def _booking(doc: str, confirmed_at: str | None, start_utc: str, end_utc: str, mark: Mark) -> Booking:
    d = json.loads(doc)
    d["confirmed_at"] = _freshness(confirmed_at, start_utc, end_utc, mark)
    return from_json(d)


def _entry(seq: int, room: str, room_seq: int, event_id: str, type_: str, subject: str, source: str, time: str,
           data: str, created_at: str) -> OutboxEntry:
    event = Event(id=event_id, type=EventType(type_), room=room, subject=subject, time=_parse_ts(time),
                  data=json.loads(data), sequence=room_seq, source=source)
    return OutboxEntry(seq=seq, room_seq=room_seq, event=event, created_at=_parse_ts(created_at))

