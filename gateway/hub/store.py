"""The reference hub's durable state in one SQLite file: customers, gateways and their keys, enrollment tokens,
API keys, the events every gateway relayed, a per-customer view of rooms and bookings, and webhook cursors.

Everything here is blocking; the hub calls it from worker threads, ``gateway hub`` subcommands call it directly
(so an admin can act on a hub's data directory while it runs: WAL mode and a busy timeout make that safe).

Secrets are stored hashed (SHA-256): enrollment tokens and customer API keys are long random strings, so a plain
digest is enough and lets the hub look them up by value. The webhook signing secrets are the exception: the hub
needs them to sign, so the database file itself is sensitive (keep it on an encrypted volume, mode 0600).

Events: one transaction per ``events`` message stores the batch, updates the materialized view and the
gateway's acknowledged sequence together, so an ack never names an event that is not on disk and the view never
disagrees with the event log. An event id already stored for the customer is dropped (a redelivery).

Retention (``prune_events``) deletes the oldest events, never the view and never one a webhook has yet to deliver.
Every stored time comes from the store's ``clock``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from gateway.errors import AuthError, ConfigError, NotFound, PreconditionFailed
from gateway.model import EVENT_TYPES
from gateway.security import permissions

DB_NAME: Final = "hub.db"
BUSY_TIMEOUT_MS: Final = 10_000
SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
CUSTOMER_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}$"
CUSTOMER_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
GRAPH_ROUTE_BYTES: Final = 24  # 192 random bits: a Graph webhook route cannot be guessed



# What the hub's callers are told apart by (the admin API's HTTP status, the CLI's words): classes, not key strings.
class InvalidCustomerId(ConfigError):
    key = "invalid_customer_id"


class TokenUnknown(AuthError):
    key = "invalid_token"


class TokenSpent(AuthError):
    """Used or expired: ask for a new one."""

    key = "token_used"


class AlreadyThere(PreconditionFailed):
    """A customer id or a public key that exists already."""


class Unknown(NotFound):
    """A customer or gateway this hub does not have."""


_BOOKING_UPSERT = frozenset({EVENT_TYPES["created"], EVENT_TYPES["updated"]})
_BOOKING_DELETE = EVENT_TYPES["deleted"]
_ROOM_STATE = EVENT_TYPES["room_state"]
_ROOM_SNAPSHOT = EVENT_TYPES["room_snapshot"]

MIGRATIONS: Final = [
    """
    CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,        -- the hub's per-customer event sequence (SSE ids)
        webhook_url TEXT,
        webhook_secret TEXT,                        -- whsec_...: needed to sign, so not hashed
        webhook_cursor INTEGER NOT NULL DEFAULT 0,  -- the last event delivered to the webhook
        webhook_error TEXT,
        webhook_failing_since TEXT
    );
    CREATE TABLE enrollment_tokens (
        hash TEXT PRIMARY KEY,                      -- sha256 of the token; the token itself is never stored
        customer TEXT NOT NULL REFERENCES customers (id),
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT,
        gateway_id TEXT
    );
    CREATE TABLE gateways (
        id TEXT PRIMARY KEY,
        customer TEXT NOT NULL REFERENCES customers (id),
        name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT,
        last_seq INTEGER NOT NULL DEFAULT 0,        -- the highest gateway seq stored and acknowledged
        last_seen_at TEXT,
        agent TEXT
    );
    CREATE INDEX gateways_by_customer ON gateways (customer);
    CREATE TABLE gateway_keys (
        key_id TEXT PRIMARY KEY,
        gateway_id TEXT NOT NULL REFERENCES gateways (id),
        public_key BLOB NOT NULL,
        generation INTEGER NOT NULL,                -- rotation order: authenticating with one retires older ones
        added_at TEXT NOT NULL,
        retired_at TEXT
    );
    CREATE INDEX gateway_keys_by_gateway ON gateway_keys (gateway_id);
    CREATE TABLE api_keys (
        hash TEXT PRIMARY KEY,
        customer TEXT NOT NULL REFERENCES customers (id),
        hint TEXT NOT NULL,                         -- the first characters, to tell keys apart in a listing
        created_at TEXT NOT NULL
    );
    -- body: the CloudEvent as JSON text, exactly what SSE and webhooks send.
    CREATE TABLE events (
        customer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        gateway_id TEXT NOT NULL,
        gateway_seq INTEGER NOT NULL,
        room TEXT NOT NULL,
        room_seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        received_at TEXT NOT NULL,
        UNIQUE (customer, seq),
        UNIQUE (customer, event_id)
    );
    CREATE TABLE rooms (
        customer TEXT NOT NULL,
        room TEXT NOT NULL COLLATE NOCASE,
        gateway_id TEXT NOT NULL,                   -- who relays it: commands for the room go there
        state TEXT NOT NULL DEFAULT 'verified',
        reason TEXT NOT NULL DEFAULT '',
        remedy TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL,
        PRIMARY KEY (customer, room)
    );
    -- start_utc / end_utc: YYYY-MM-DDTHH:MM:SSZ, so text order is time order.
    CREATE TABLE bookings (
        customer TEXT NOT NULL,
        id TEXT NOT NULL,
        room TEXT NOT NULL COLLATE NOCASE,
        start_utc TEXT NOT NULL,
        end_utc TEXT NOT NULL,
        busy INTEGER NOT NULL,                      -- counts for availability (not cancelled, declined or free)
        free_busy TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (customer, id)
    );
    CREATE INDEX bookings_by_room ON bookings (customer, room, start_utc);
    """,
    # route: the unguessable path segment of a gateway's Graph webhook URLs (gateway/hub/graph_notifications.py),
    # minted once, so the URLs stay the same across reconnects and restarts.
    """
    CREATE TABLE graph_routes (
        gateway_id TEXT PRIMARY KEY REFERENCES gateways (id),
        route TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    """,
    # stale: between a room.snapshot begin and its end, a booking not announced again (gone from Exchange while the
    # room changed owner); the end drops those.
    """
    ALTER TABLE bookings ADD COLUMN stale INTEGER NOT NULL DEFAULT 0;
    """,
]


# -- what it returns ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    name: str
    created_at: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class GatewayKey:
    key_id: str
    public_key: bytes
    generation: int
    retired: bool


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    id: str
    customer: str
    name: str
    created_at: str
    revoked_at: str | None
    last_seq: int
    last_seen_at: str | None
    agent: str | None
    keys: tuple[GatewayKey, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "customer": self.customer, "name": self.name, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "last_seq": self.last_seq, "last_seen_at": self.last_seen_at,
                "agent": self.agent, "keys": [k.key_id for k in self.keys if not k.retired]}


@dataclass(frozen=True, slots=True)
class Enrollment:
    gateway_id: str
    customer: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of one ``events`` message."""

    ack: int  # the gateway's highest seq now stored
    stored: int  # new events
    duplicates: int  # redelivered events, dropped
    customer_seq: int  # the customer's last event sequence after the batch


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    type: str
    event_id: str
    body: str


@dataclass(frozen=True, slots=True)
class EventStats:
    """One customer's events as the metrics see them."""

    customer: str
    events: int  # kept in the store now
    newest_at: datetime | None  # when the newest was stored
    webhook_backlog: int | None  # stored but not yet delivered to the webhook (None: no webhook)


@dataclass(frozen=True, slots=True)
class Webhook:
    customer: str
    url: str
    secret: str
    cursor: int
    error: str | None
    failing_since: str | None


class EventItem:
    """One element of an ``events`` message, validated by the hub: (seq, room_seq, the CloudEvent dict)."""

    __slots__ = ("event", "room_seq", "seq")

    def __init__(self, seq: int, room_seq: int, event: dict[str, Any]) -> None:
        self.seq = seq
        self.room_seq = room_seq
        self.event = event


# -- helpers -----------------------------------------------------------------------------------------------------
def utc_now() -> datetime:
    return datetime.now(UTC)


def now_iso(t: datetime | None = None) -> str:
    return (t or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _utc_text(value: Any) -> str | None:
    """A booking time as fixed-width UTC text (None when it is not a date-time with an offset)."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    return now_iso(t)


Clock = Callable[[], datetime]
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class HubStore:
    """The hub's SQLite file (WAL). One writer connection behind a lock; one reader connection per thread."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", clock: Clock = utc_now) -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            raise ConfigError(f"unknown synchronous mode {synchronous!r}", remedy=f"use one of {SYNCHRONOUS}")
        self.path = Path(path)
        self.clock = clock  # every stored time (events' received_at too); injectable so retention is testable
        existed = self.path.exists()
        permissions.make_private_dir(self.path.parent, setting="--data")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            with permissions.private_umask():  # the file and its -wal/-shm are 0600 from the start
                self._writer = self._connect()
                mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    self._writer.close()
                    raise ConfigError(f"{self.path}: SQLite cannot use WAL mode here (got {mode!r})",
                                      key="hub_store_unusable", remedy="put the hub's data directory on a local disk")
                # NORMAL in WAL mode: a commit survives a crash of the process (not a power loss; FULL for that).
                self._writer.execute(f"PRAGMA synchronous={synchronous.upper()}")
                self._migrate()
        except sqlite3.DatabaseError as e:
            if "unable to open" in str(e) or "readonly" in str(e):
                raise permissions.unwritable(self.path, e, "--data") from None
            raise ConfigError(f"the hub database {self.path} is unusable: {e}", key="hub_store_unusable",
                              remedy="check the --data directory (permissions, free space) or restore the file "
                                     "from a backup") from None
        files = permissions.sqlite_files(self.path)
        if existed:
            permissions.warn_if_loose((*files, self.path.parent), "hub.store_permissions_too_open")
        else:
            permissions.make_private(files)

    @classmethod
    def in_dir(cls, data_dir: str | Path, **kw: Any) -> HubStore:
        return cls(Path(data_dir) / DB_NAME, **kw)

    def _now(self) -> str:
        return now_iso(self.clock())

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    def _migrate(self) -> None:
        conn = self._writer
        for version, script in enumerate(MIGRATIONS, start=1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current > len(MIGRATIONS):
                    raise ConfigError(f"{self.path} has schema version {current}, written by a newer hub",
                                      key="hub_store_too_new", remedy="run the hub version that wrote it, or newer")
                if current < version:
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={version}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the hub store is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the hub store is closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                readers, self._readers = self._readers, []
            for conn in readers:
                conn.close()
            self._writer.close()

    # -- customers ------------------------------------------------------------------------------------------
    def add_customer(self, customer_id: str, name: str | None = None) -> Customer:
        if not CUSTOMER_ID_RE.fullmatch(customer_id):
            raise InvalidCustomerId(f"{customer_id!r} is not a valid customer id",
                                    remedy="use 1-63 lower-case letters, digits, '-' and '_', starting with a letter "
                                           "or digit, e.g. contoso")
        created = self._now()
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO customers (id, name, created_at) VALUES (?, ?, ?)",
                             (customer_id, name or customer_id, created))
            except sqlite3.IntegrityError:
                raise AlreadyThere(f"the customer {customer_id!r} exists already", key="customer_exists",
                                   remedy="pick another id, or use the existing customer") from None
        return Customer(customer_id, name or customer_id, created, 0)

    def customer(self, customer_id: str) -> Customer | None:
        row = self._read().execute("SELECT id, name, created_at, last_seq FROM customers WHERE id = ?",
                                   (customer_id,)).fetchone()
        return Customer(*row) if row else None

    def customers(self) -> list[Customer]:
        rows = self._read().execute("SELECT id, name, created_at, last_seq FROM customers ORDER BY id").fetchall()
        return [Customer(*r) for r in rows]

    def _require_customer(self, conn: sqlite3.Connection, customer_id: str) -> None:
        if conn.execute("SELECT 1 FROM customers WHERE id = ?", (customer_id,)).fetchone() is None:
            raise Unknown(f"there is no customer {customer_id!r} at this hub", key="customer_unknown",
                          remedy="add it first: `gateway hub customer add ID` or POST /admin/v1/customers")

    # -- enrollment -----------------------------------------------------------------------------------------
    def issue_token(self, customer_id: str, ttl: timedelta) -> tuple[str, str]:
        """A single-use enrollment token for the customer: (token, expires_at). Only its digest is stored."""
        token = "et_" + secrets.token_urlsafe(32)
        now = self.clock()
        expires = now_iso(now + ttl)
        with self._write() as conn:
            self._require_customer(conn, customer_id)
            conn.execute("INSERT INTO enrollment_tokens (hash, customer, created_at, expires_at) VALUES (?, ?, ?, ?)",
                         (digest(token), customer_id, now_iso(now), expires))
        return token, expires

    def enroll(self, token: str, public_key: bytes, key_id: str, name: str) -> Enrollment:
        """Consume the token (atomically: of two racing enrollments exactly one wins) and register a gateway
        with its first key."""
        now = self._now()
        with self._write() as conn:
            row = conn.execute("SELECT customer, expires_at, used_at FROM enrollment_tokens WHERE hash = ?",
                               (digest(token),)).fetchone()
            if row is None:
                raise TokenUnknown("the enrollment token is not known at this hub",
                                   remedy="ask the hub operator for a new token (`gateway hub token CUSTOMER`)")
            customer, expires_at, used_at = row
            if used_at is not None:
                raise TokenSpent(f"the enrollment token was used already (at {used_at})",
                                 remedy="tokens are single use; ask the hub operator for a new one")
            if expires_at <= now:
                raise TokenSpent(f"the enrollment token expired at {expires_at}", key="token_expired",
                                 remedy="ask the hub operator for a new token (`gateway hub token CUSTOMER`)")
            if conn.execute("SELECT 1 FROM gateway_keys WHERE key_id = ?", (key_id,)).fetchone():
                raise AlreadyThere("this public key is already enrolled", key="key_in_use",
                                   remedy="generate a new key pair for the gateway and enroll again")
            gateway_id = "gw_" + secrets.token_urlsafe(12)
            conn.execute("UPDATE enrollment_tokens SET used_at = ?, gateway_id = ? WHERE hash = ? AND used_at IS NULL",
                         (now, gateway_id, digest(token)))
            conn.execute("INSERT INTO gateways (id, customer, name, created_at) VALUES (?, ?, ?, ?)",
                         (gateway_id, customer, name, now))
            conn.execute("INSERT INTO gateway_keys (key_id, gateway_id, public_key, generation, added_at) "
                         "VALUES (?, ?, ?, 1, ?)", (key_id, gateway_id, public_key, now))
        return Enrollment(gateway_id, customer, key_id)

    # -- gateways and keys ----------------------------------------------------------------------------------
    def gateway(self, gateway_id: str) -> GatewayRecord | None:
        conn = self._read()
        row = conn.execute("SELECT id, customer, name, created_at, revoked_at, last_seq, last_seen_at, agent "
                           "FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
        if row is None:
            return None
        keys = conn.execute("SELECT key_id, public_key, generation, retired_at IS NOT NULL FROM gateway_keys "
                            "WHERE gateway_id = ? ORDER BY generation", (gateway_id,)).fetchall()
        gid, customer, name, created, revoked, last_seq, seen, agent = row
        return GatewayRecord(gid, customer, name, created, revoked, int(last_seq), seen, agent,
                             keys=tuple(GatewayKey(k, bytes(p), g, bool(r)) for k, p, g, r in keys))

    def gateways(self) -> list[GatewayRecord]:
        ids = [r[0] for r in self._read().execute("SELECT id FROM gateways ORDER BY customer, created_at, id")]
        return [g for g in (self.gateway(i) for i in ids) if g is not None]

    def authenticated(self, gateway_id: str, key_id: str, agent: str | None) -> int:
        """Record a successful handshake: retire the keys older than the one used (a rotation is complete once
        the gateway signs with its new key) and return the gateway's acknowledged sequence."""
        with self._write() as conn:
            gen = conn.execute("SELECT generation FROM gateway_keys WHERE key_id = ? AND gateway_id = ?",
                               (key_id, gateway_id)).fetchone()
            if gen is not None:
                conn.execute("UPDATE gateway_keys SET retired_at = ? WHERE gateway_id = ? AND generation < ? "
                             "AND retired_at IS NULL", (self._now(), gateway_id, gen[0]))
            conn.execute("UPDATE gateways SET last_seen_at = ?, agent = ? WHERE id = ?",
                         (self._now(), (agent or "")[:200] or None, gateway_id))
            row = conn.execute("SELECT last_seq FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
        return int(row[0]) if row else 0

    def graph_route(self, gateway_id: str) -> str:
        """The gateway's Graph webhook route, minted the first time it is asked for."""
        with self._write() as conn:
            row = conn.execute("SELECT route FROM graph_routes WHERE gateway_id = ?", (gateway_id,)).fetchone()
            if row is not None:
                return str(row[0])
            route = secrets.token_urlsafe(GRAPH_ROUTE_BYTES)
            conn.execute("INSERT INTO graph_routes (gateway_id, route, created_at) VALUES (?, ?, ?)",
                         (gateway_id, route, self._now()))
        return route

    def gateway_for_graph_route(self, route: str) -> str | None:
        """The gateway a Graph webhook route belongs to; None for an unknown route or a revoked gateway."""
        row = self._read().execute("SELECT g.id FROM graph_routes r JOIN gateways g ON g.id = r.gateway_id "
                                   "WHERE r.route = ? AND g.revoked_at IS NULL", (route,)).fetchone()
        return None if row is None else str(row[0])

    def reset_ack(self, gateway_id: str, seq: int) -> None:
        """Lower a gateway's acknowledged sequence (its stream restarted: a new or restored store)."""
        with self._write() as conn:
            conn.execute("UPDATE gateways SET last_seq = ? WHERE id = ?", (seq, gateway_id))

    def add_key(self, gateway_id: str, public_key: bytes, key_id: str) -> bool:
        """Add a rotated-in key (the older keys stay valid until it is used). False if another gateway has it."""
        with self._write() as conn:
            row = conn.execute("SELECT gateway_id FROM gateway_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is not None:
                return bool(row[0] == gateway_id)  # the same rotation sent again (after a reconnect): fine
            gen = conn.execute("SELECT COALESCE(MAX(generation), 0) FROM gateway_keys WHERE gateway_id = ?",
                               (gateway_id,)).fetchone()[0]
            conn.execute("INSERT INTO gateway_keys (key_id, gateway_id, public_key, generation, added_at) "
                         "VALUES (?, ?, ?, ?, ?)", (key_id, gateway_id, public_key, gen + 1, self._now()))
        return True

    def revoke(self, gateway_id: str) -> str:
        """Revoke a gateway (idempotent); returns when it was revoked."""
        with self._write() as conn:
            row = conn.execute("SELECT revoked_at FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is None:
                raise Unknown(f"there is no gateway {gateway_id!r} at this hub", key="gateway_unknown",
                              remedy="list them with `gateway hub gateways` or GET /admin/v1/gateways")
            if row[0]:
                return str(row[0])
            at = self._now()
            conn.execute("UPDATE gateways SET revoked_at = ? WHERE id = ?", (at, gateway_id))
        return at

    def revoked_among(self, gateway_ids: Sequence[str]) -> set[str]:
        if not gateway_ids:
            return set()
        marks = ",".join("?" * len(gateway_ids))
        rows = self._read().execute(f"SELECT id FROM gateways WHERE revoked_at IS NOT NULL AND id IN ({marks})",
                                    list(gateway_ids)).fetchall()
        return {r[0] for r in rows}

    # -- API keys -------------------------------------------------------------------------------------------
    def issue_api_key(self, customer_id: str) -> str:
        key = "ck_" + secrets.token_urlsafe(32)
        with self._write() as conn:
            self._require_customer(conn, customer_id)
            conn.execute("INSERT INTO api_keys (hash, customer, hint, created_at) VALUES (?, ?, ?, ?)",
                         (digest(key), customer_id, key[:7], self._now()))
        return key

    def customer_for_api_key(self, key: str) -> str | None:
        row = self._read().execute("SELECT customer FROM api_keys WHERE hash = ?", (digest(key),)).fetchone()
        return str(row[0]) if row else None

    # -- events ---------------------------------------------------------------------------------------------
    def store_events(self, gateway_id: str, customer: str, items: Sequence[EventItem]) -> Stored:
        """Store one ``events`` message in one transaction (see the module docstring)."""
        received = self._now()
        stored = duplicates = 0
        rooms: dict[str, None] = {}
        top = max(i.seq for i in items)
        with self._write() as conn:
            last = conn.execute("SELECT last_seq FROM customers WHERE id = ?", (customer,)).fetchone()[0]
            insert = conn.execute
            for item in items:
                ev = item.event
                room = _room_of(ev)
                cur = insert("INSERT OR IGNORE INTO events (customer, seq, event_id, gateway_id, gateway_seq, room, "
                             "room_seq, type, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (customer, last + 1, ev["id"], gateway_id, item.seq, room, item.room_seq, ev["type"],
                              _dumps(ev), received))
                if cur.rowcount == 0:
                    duplicates += 1
                    continue
                last += 1
                stored += 1
                if room:
                    rooms[room] = None
                _project(conn, customer, gateway_id, room, ev, received)
            if rooms:
                conn.executemany("INSERT INTO rooms (customer, room, gateway_id, updated_at) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT (customer, room) DO UPDATE SET gateway_id = excluded.gateway_id",
                                 [(customer, r, gateway_id, received) for r in rooms])
            conn.execute("UPDATE customers SET last_seq = ? WHERE id = ?", (last, customer))
            conn.execute("UPDATE gateways SET last_seq = MAX(last_seq, ?), last_seen_at = ? WHERE id = ?",
                         (top, received, gateway_id))
            ack = conn.execute("SELECT last_seq FROM gateways WHERE id = ?", (gateway_id,)).fetchone()[0]
        return Stored(ack=int(ack), stored=stored, duplicates=duplicates, customer_seq=int(last))

    def events_after(self, customer: str, after: int, limit: int = 500) -> list[StoredEvent]:
        rows = self._read().execute("SELECT seq, type, event_id, body FROM events WHERE customer = ? AND seq > ? "
                                    "ORDER BY seq LIMIT ?", (customer, after, limit)).fetchall()
        return [StoredEvent(*r) for r in rows]

    def event_count(self, customer: str) -> int:
        return int(self._read().execute("SELECT count(*) FROM events WHERE customer = ?", (customer,)).fetchone()[0])

    def event_stats(self) -> list[EventStats]:
        """Per customer: the events kept and when the newest was stored. Index lookups only (no counting), so a
        metrics scrape stays cheap however many events there are: a customer's seqs are contiguous (each stored
        event takes last_seq + 1) and pruning only removes the oldest, so the count is max - min + 1."""
        conn = self._read()
        out: list[EventStats] = []
        for customer, last_seq, cursor, has_webhook in conn.execute(
                "SELECT id, last_seq, webhook_cursor, webhook_url IS NOT NULL FROM customers ORDER BY id").fetchall():
            oldest = conn.execute("SELECT seq FROM events WHERE customer = ? ORDER BY seq LIMIT 1",
                                  (customer,)).fetchone()
            newest = conn.execute("SELECT seq, received_at FROM events WHERE customer = ? ORDER BY seq DESC LIMIT 1",
                                  (customer,)).fetchone()
            count = int(newest[0]) - int(oldest[0]) + 1 if oldest is not None and newest is not None else 0
            out.append(EventStats(customer, count, _parse_iso(newest[1]) if newest is not None else None,
                                  int(last_seq) - int(cursor) if has_webhook else None))
        return out

    def prune_events(self, customer: str, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` of the customer's oldest events stored before ``before``, in one short
        transaction (the caller repeats until it gets fewer than ``limit``). Never an event after the webhook
        cursor (not delivered yet), and never the rooms/bookings view.

        It walks from the oldest event and stops at the first one that must stay, so each call reads at most
        ``limit`` rows through the (customer, seq) index: no index on received_at is needed, which keeps the
        events path as cheap as it was. Stored times rise with seq (both are assigned under the write lock); after
        a wall-clock step back an old event behind a newer-stamped one waits until that one ages out too."""
        cutoff = now_iso(before)
        with self._write() as conn:
            row = conn.execute("SELECT webhook_url IS NOT NULL, webhook_cursor FROM customers WHERE id = ?",
                               (customer,)).fetchone()
            if row is None:
                return 0
            cap = int(row[1]) if row[0] else None
            upto: int | None = None
            for seq, received in conn.execute("SELECT seq, received_at FROM events WHERE customer = ? ORDER BY seq "
                                              "LIMIT ?", (customer, limit)).fetchall():
                if received >= cutoff or (cap is not None and seq > cap):
                    break
                upto = seq
            if upto is None:
                return 0
            return int(conn.execute("DELETE FROM events WHERE customer = ? AND seq <= ?", (customer, upto)).rowcount)

    # -- the materialized view ------------------------------------------------------------------------------
    def rooms(self, customer: str) -> list[dict[str, Any]]:
        rows = self._read().execute("SELECT room, state, reason, remedy, updated_at, gateway_id FROM rooms "
                                    "WHERE customer = ? ORDER BY room", (customer,)).fetchall()
        return [{"email": r[0], "state": r[1], "reason": r[2], "remedy": r[3], "updated_at": r[4],
                 "gateway_id": r[5]} for r in rows]

    def has_room(self, customer: str, room: str) -> bool:
        return self._read().execute("SELECT 1 FROM rooms WHERE customer = ? AND room = ?",
                                    (customer, room)).fetchone() is not None

    def gateway_for_room(self, customer: str, room: str) -> str | None:
        row = self._read().execute("SELECT gateway_id FROM rooms WHERE customer = ? AND room = ?",
                                   (customer, room)).fetchone()
        return str(row[0]) if row else None

    def bookings(self, customer: str, room: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        rows = self._read().execute(
            "SELECT doc FROM bookings WHERE customer = ? AND room = ? AND start_utc < ? AND end_utc > ? "
            "ORDER BY start_utc, id", (customer, room, now_iso(end), now_iso(start))).fetchall()
        return [json.loads(r[0]) for r in rows]

    def busy(self, customer: str, rooms: Sequence[str], start: datetime, end: datetime) -> dict[str, list[dict[str,
                                                                                                           str]]]:
        """Busy intervals per room from the stored bookings (the shape of an availability command's data)."""
        out: dict[str, list[dict[str, str]]] = {}
        conn = self._read()
        for room in rooms:
            rows = conn.execute(
                "SELECT start_utc, end_utc, free_busy FROM bookings WHERE customer = ? AND room = ? AND busy = 1 "
                "AND start_utc < ? AND end_utc > ? ORDER BY start_utc", (customer, room, now_iso(end),
                                                                         now_iso(start))).fetchall()
            out[room] = [{"start": s, "end": e, "status": fb} for s, e, fb in rows]
        return out

    # -- webhooks -------------------------------------------------------------------------------------------
    def set_webhook(self, customer: str, url: str | None) -> str | None:
        """Set (or with None remove) the customer's webhook; returns a new signing secret. A first webhook starts
        with the next event; changing the URL keeps the cursor (nothing is skipped or sent twice)."""
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode() if url else None
        with self._write() as conn:
            self._require_customer(conn, customer)
            if url is None:
                conn.execute("UPDATE customers SET webhook_url = NULL, webhook_secret = NULL, webhook_error = NULL, "
                             "webhook_failing_since = NULL WHERE id = ?", (customer,))
            else:
                conn.execute("UPDATE customers SET webhook_cursor = CASE WHEN webhook_url IS NULL THEN last_seq "
                             "ELSE webhook_cursor END, webhook_url = ?, webhook_secret = ?, webhook_error = NULL, "
                             "webhook_failing_since = NULL WHERE id = ?", (url, secret, customer))
        return secret

    def webhook(self, customer: str) -> Webhook | None:
        row = self._read().execute("SELECT id, webhook_url, webhook_secret, webhook_cursor, webhook_error, "
                                   "webhook_failing_since FROM customers WHERE id = ? AND webhook_url IS NOT NULL",
                                   (customer,)).fetchone()
        return Webhook(*row) if row else None

    def webhooks(self) -> list[Webhook]:
        rows = self._read().execute("SELECT id, webhook_url, webhook_secret, webhook_cursor, webhook_error, "
                                    "webhook_failing_since FROM customers WHERE webhook_url IS NOT NULL").fetchall()
        return [Webhook(*r) for r in rows]

    def webhook_delivered(self, customer: str, seq: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE customers SET webhook_cursor = MAX(webhook_cursor, ?), webhook_error = NULL, "
                         "webhook_failing_since = NULL WHERE id = ?", (seq, customer))

    def webhook_failed(self, customer: str, error: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE customers SET webhook_error = ?, webhook_failing_since = "
                         "COALESCE(webhook_failing_since, ?) WHERE id = ?", (error[:500], self._now(), customer))


def _statements(script: str) -> list[str]:
    """Complete statements, one by one (``executescript`` would commit the surrounding transaction)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    return out


def _room_of(ev: dict[str, Any]) -> str:
    if ".person." in str(ev.get("type")):  # a directory's people (partition directory:NAME) belong to no room
        return ""
    data = ev.get("data")
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str):
        room = ev.get("partitionkey")
    return room.lower() if isinstance(room, str) else ""


def _project(conn: sqlite3.Connection, customer: str, gateway_id: str, room: str, ev: dict[str, Any],
             received: str) -> None:
    """Apply one new event to the rooms/bookings view. Events whose data does not fit are kept in the log but
    leave the view alone (the gateway's store, not the hub, is where a malformed booking must be fixed)."""
    kind = ev["type"]
    data = ev.get("data")
    if not isinstance(data, dict) or not room:
        return
    if kind in _BOOKING_UPSERT:
        booking_id, start, end = data.get("id"), _utc_text(data.get("start")), _utc_text(data.get("end"))
        if not isinstance(booking_id, str) or start is None or end is None:
            return
        free_busy = data.get("free_busy") if isinstance(data.get("free_busy"), str) else "busy"
        busy = not data.get("cancelled") and data.get("response") != "declined" and free_busy != "free"
        conn.execute("INSERT INTO bookings (customer, id, room, start_utc, end_utc, busy, free_busy, doc) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer, id) DO UPDATE SET room = excluded.room, "
                     "start_utc = excluded.start_utc, end_utc = excluded.end_utc, busy = excluded.busy, "
                     "free_busy = excluded.free_busy, doc = excluded.doc, stale = 0",
                     (customer, booking_id, room, start, end, int(busy), free_busy, _dumps(data)))
    elif kind == _BOOKING_DELETE:
        booking_id = data.get("id")
        if isinstance(booking_id, str):
            conn.execute("DELETE FROM bookings WHERE customer = ? AND id = ?", (customer, booking_id))
    elif kind == _ROOM_SNAPSHOT:
        window = data.get("window")
        window = window if isinstance(window, dict) else {}
        start, end = _utc_text(window.get("start")), _utc_text(window.get("end"))
        if data.get("phase") == "begin" and start is not None and end is not None:
            conn.execute("UPDATE bookings SET stale = 1 WHERE customer = ? AND room = ? AND start_utc < ? "
                         "AND end_utc > ?", (customer, room, end, start))
        elif data.get("phase") == "end":
            conn.execute("DELETE FROM bookings WHERE customer = ? AND room = ? AND stale = 1", (customer, room))
    elif kind == _ROOM_STATE:
        state = data.get("state")
        if isinstance(state, str):
            conn.execute("INSERT INTO rooms (customer, room, gateway_id, state, reason, remedy, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer, room) DO UPDATE SET "
                         "gateway_id = excluded.gateway_id, state = excluded.state, reason = excluded.reason, "
                         "remedy = excluded.remedy, updated_at = excluded.updated_at",
                         (customer, room, gateway_id, state, str(data.get("reason") or ""),
                          str(data.get("remedy") or ""), received))
