"""The SQLite schema, as numbered migrations.

``MIGRATIONS[n - 1]`` takes a database from ``PRAGMA user_version`` n - 1 to n. Each script runs in its own
transaction together with the version bump, so a crash mid-upgrade leaves the previous version intact. Never edit
a migration that has shipped: append a new one. Shipped as Python (not .sql files) so no package data is needed.

Room addresses compare case-insensitively (``COLLATE NOCASE``): an address typed differently in the configuration
is the same mailbox.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE rooms (
        email TEXT PRIMARY KEY COLLATE NOCASE,
        name TEXT,
        capacity INTEGER,
        timezone TEXT NOT NULL DEFAULT 'UTC',
        state TEXT NOT NULL DEFAULT 'pending',
        reason TEXT NOT NULL DEFAULT '',
        remedy TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL
    );

    -- TEXT is unbounded in SQLite: a truncated SyncState is rejected by Exchange with ErrorInvalidSyncStateData
    -- (exchange-semantics.md 2.1, bug 11).
    CREATE TABLE sync_states (
        room TEXT PRIMARY KEY COLLATE NOCASE REFERENCES rooms (email) ON DELETE CASCADE,
        state TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );

    -- start_utc / end_utc: fixed-width ISO-8601 UTC with microseconds, so text order is time order.
    -- json: the booking's published form without confirmed_at, which lives in its own column (freshness is
    -- rewritten on every reconciliation; the content is not).
    CREATE TABLE bookings (
        room TEXT NOT NULL COLLATE NOCASE REFERENCES rooms (email) ON DELETE CASCADE,
        id TEXT NOT NULL,
        uid TEXT NOT NULL,
        start_utc TEXT NOT NULL,
        end_utc TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        json TEXT NOT NULL,
        confirmed_at TEXT,
        PRIMARY KEY (room, id)
    );
    CREATE INDEX bookings_by_start ON bookings (room, start_utc);
    CREATE INDEX bookings_by_uid ON bookings (room, uid);

    -- Exchange item id -> meeting UID: a deleted item arrives as an id only.
    CREATE TABLE item_map (
        room TEXT NOT NULL COLLATE NOCASE REFERENCES rooms (email) ON DELETE CASCADE,
        item_id TEXT NOT NULL,
        uid TEXT NOT NULL,
        PRIMARY KEY (room, item_id)
    );

    -- The outbox outlives a removed room (its last events must still be delivered): no foreign key.
    -- AUTOINCREMENT: a seq is never reused, even after pruning emptied the table.
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        room TEXT NOT NULL COLLATE NOCASE,
        room_seq INTEGER NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        subject TEXT NOT NULL,
        source TEXT NOT NULL,
        time TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (room, room_seq)
    );

    -- The last room_seq handed out per room, kept apart from the outbox so pruning never lets it go backwards.
    CREATE TABLE outbox_rooms (
        room TEXT PRIMARY KEY COLLATE NOCASE,
        last_seq INTEGER NOT NULL
    );

    -- The highest global seq the consumer (the hub) acknowledged. One row.
    CREATE TABLE outbox_ack (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL
    );
    INSERT INTO outbox_ack (id, seq) VALUES (1, 0);
    """,
    # 2: the command journal (idempotency) and the local API keys.
    """
    -- One row per idempotency key. state: started (the Exchange write may or may not have happened: recover by
    -- looking for the key's extended property on the item), done (result holds the final CommandResult JSON).
    CREATE TABLE command_journal (
        key TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        room TEXT COLLATE NOCASE,
        request_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        mailbox TEXT COLLATE NOCASE,  -- where the item the command made lives (organizer or room)
        item_id TEXT,
        uid TEXT,  -- the meeting UID of what the command created
        result TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX command_journal_by_uid ON command_journal (uid);

    -- Local API keys: only a SHA-256 of the (random, 256-bit) secret is kept; scopes: comma-separated.
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT,
        revoked_at TEXT
    );
    """,
    # 3: the directory's people (the people sync's snapshot) and how far each directory's sync has read.
    """
    -- One row per person per directory stream (directory:NAME); json: what was last relayed (schemas/person.v1.json).
    CREATE TABLE people (
        stream TEXT NOT NULL,
        id TEXT NOT NULL,
        dn TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        json TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (stream, id)
    );

    -- usn: the directory's change counter read up to; dc: the domain controller it counts on.
    CREATE TABLE people_state (
        stream TEXT PRIMARY KEY,
        usn INTEGER NOT NULL,
        dc TEXT NOT NULL,
        full_at TEXT
    );
    """,
    # 4: a complete read of a room's window confirms its bookings there in one row, not in every booking's row.
    """
    -- Every booking of the room overlapping [window_start, window_end) was seen in Exchange at confirmed_at: a
    -- booking's freshness is the later of its own confirmed_at and this, when it overlaps the window. Rewriting each
    -- booking's row (a kilobyte of JSON) to move its confirmed_at was a fifth of a reconciliation's CPU.
    CREATE TABLE room_confirmations (
        room TEXT PRIMARY KEY COLLATE NOCASE REFERENCES rooms (email) ON DELETE CASCADE,
        window_start TEXT NOT NULL,
        window_end TEXT NOT NULL,
        confirmed_at TEXT NOT NULL
    );
    """,
]


def statements(script: str) -> list[str]:
    """Split a script into complete statements (``executescript`` would commit the surrounding transaction)."""
    result: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                result.append(pending.strip())
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]!r}")
    return result
