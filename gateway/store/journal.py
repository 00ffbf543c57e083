"""The command journal: one row per idempotency key, so a retried command never books twice.

A row is ``started`` from the moment a command is admitted until its outcome is final (``done``, with the
CommandResult kept as JSON). A started row found later means the command did not finish here: the process
crashed, the attendant did not answer in time, or Exchange failed mid-write. ``mailbox``/``item_id``/``uid``
record what the command wrote as soon as the write returned, so a retry continues from there; a started row
without them makes the caller ask Exchange (the key is stamped on every item the gateway writes).

Synchronous like the store (sqlite3); the async command service calls it in a thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.model import Command, CommandResult
from gateway.ports import Written
from gateway.store.sqlite import SqliteStore

STATES = ("started", "done")
DEFAULT_RETENTION = timedelta(days=30)
_COLUMNS = "key, type, room, request_hash, state, mailbox, item_id, uid, result, created_at, updated_at"


def _ts(value: datetime) -> str:
    """Fixed-width UTC text whose lexical order is time order (as the store writes its own timestamps)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class JournalEntry:
    key: str
    type: str
    room: str | None
    request_hash: str
    state: str  # started, done
    mailbox: str | None  # where the written item lives: the organizer (meeting) or the room (appointment)
    item_id: str | None
    uid: str | None
    result: CommandResult | None  # done rows only
    created_at: datetime
    updated_at: datetime

    @property
    def written(self) -> Written | None:
        """What the command wrote into Exchange, once the write returned (None before)."""
        if not self.mailbox or not self.item_id or self.uid is None:
            return None
        return Written(mailbox=self.mailbox, item_id=self.item_id, uid=self.uid)


def _entry(row: tuple[object, ...]) -> JournalEntry:
    key, type_, room, request_hash, state, mailbox, item_id, uid, result, created_at, updated_at = row
    return JournalEntry(
        key=str(key), type=str(type_), room=None if room is None else str(room), request_hash=str(request_hash),
        state=str(state), mailbox=None if mailbox is None else str(mailbox),
        item_id=None if item_id is None else str(item_id), uid=None if uid is None else str(uid),
        result=CommandResult.from_json(json.loads(str(result))) if result else None,
        created_at=_parse_ts(str(created_at)), updated_at=_parse_ts(str(updated_at)))


class CommandJournal:
    """The ``command_journal`` table (migration 2) on the gateway's SQLite store."""

    def __init__(self, store: SqliteStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._now = clock or (lambda: datetime.now(UTC))

    def begin(self, cmd: Command) -> JournalEntry | None:
        """Admit a command: None if this call created its ``started`` row, else the row already there.

        Insert and read happen in one write transaction, so of two callers with the same key exactly one gets
        None (the write lock is taken up front: BEGIN IMMEDIATE).
        """
        now = _ts(self._now())
        with self._store.transaction() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO command_journal (key, type, room, request_hash, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'started', ?, ?)", (cmd.key, cmd.type, cmd.room, cmd.request_hash(), now, now))
            if cur.rowcount == 1:
                return None
            return self._get(conn, cmd.key)

    def get(self, key: str) -> JournalEntry | None:
        with self._store.reading() as conn:
            return self._get(conn, key)

    @staticmethod
    def _get(conn: sqlite3.Connection, key: str) -> JournalEntry | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM command_journal WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry(row)

    def record_write(self, key: str, written: Written) -> None:
        """Remember what the command wrote, the moment the write returned (the row's state is unchanged)."""
        with self._store.transaction() as conn:
            conn.execute("UPDATE command_journal SET mailbox = ?, item_id = ?, uid = ?, updated_at = ? WHERE key = ?",
                         (written.mailbox, written.item_id, written.uid, _ts(self._now()), key))

    def finish(self, key: str, result: CommandResult) -> None:
        """The command's final outcome: every later command with this key gets exactly this result."""
        with self._store.transaction() as conn:
            conn.execute("UPDATE command_journal SET state = 'done', result = ?, updated_at = ? WHERE key = ?",
                         (json.dumps(result.to_json(), separators=(",", ":")), _ts(self._now()), key))

    def forget(self, key: str) -> None:
        """Drop a row whose command wrote nothing and did not finish, so a retry of the key starts afresh."""
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM command_journal WHERE key = ?", (key,))

    def by_uid(self, uid: str) -> JournalEntry | None:
        """The create command that made the meeting ``uid`` (None: the gateway did not create it).

        A create whose outcome was declined or failed made no booking, so it does not count.
        """
        with self._store.reading() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM command_journal WHERE uid = ? AND type = 'create' "
                                "AND item_id IS NOT NULL ORDER BY created_at DESC", (uid,)).fetchall()
        for row in rows:
            entry = _entry(row)
            if entry.state == "started" or (entry.result is not None and entry.result.status == "accepted"):
                return entry
        return None

    def prune(self, older_than: timedelta = DEFAULT_RETENTION) -> int:
        """Delete done rows last touched before ``older_than`` ago; returns how many.

        A create whose booking is still in the snapshot is kept however old it is: it is what lets the gateway
        move or cancel that booking later. Started rows are never pruned (their command may still be retried).
        """
        cutoff = _ts(self._now() - older_than)
        with self._store.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM command_journal WHERE state = 'done' AND updated_at < ? AND NOT (type = 'create' AND "
                "uid IS NOT NULL AND EXISTS (SELECT 1 FROM bookings b WHERE b.room = command_journal.room "
                "AND b.uid = command_journal.uid))",
                (cutoff,))
            return cur.rowcount
