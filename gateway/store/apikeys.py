"""Local API keys (table ``api_keys``): created once, kept only as a hash, carrying scopes, revocable.

A key reads ``gwk_<id>_<secret>``: the id (16 hex digits) finds the row; the secret (32 random bytes,
base64url) proves possession. Only SHA-256 of the secret is stored. The secret is random with 256 bits of
entropy, so there is no dictionary to guess from and a slow KDF (bcrypt, scrypt) would only make every
request slower without making a stolen database any easier to exploit.

Verification is cheap: a key's row is cached in memory for ``CACHE_SECONDS``; every request still hashes the
presented secret and compares it in constant time, so the cache never accepts a wrong secret. A key revoked
through this object is refused at once; one revoked by another process (``gateway api-keys revoke`` next to a
running gateway) is refused within ``CACHE_SECONDS``. ``last_used_at`` is written at most once per
``TOUCH_SECONDS`` per key, never once per request.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway.errors import ConfigError
from gateway.store.sqlite import SqliteStore

SCOPES: Final = {
    "read": "GET rooms, bookings, availability and the event stream",
    "book": "POST booking commands (create, update, cancel, decline, resync, availability)",
    "metrics": "GET /metrics (open without a key when the API listens on loopback only)",
}
PREFIX: Final = "gwk_"
CACHE_SECONDS: Final = 5.0  # the longest a revocation by another process takes to reach a running gateway
TOUCH_SECONDS: Final = 60.0
CACHE_ENTRIES: Final = 4096  # unknown ids are cached too (a client retrying a bad key costs no reads); bounded

_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, base64url without padding
_NAME_RE = re.compile(r"^[\w .@:/+-]{1,64}$")
_DUMMY_HASH: Final = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A verified key: who is calling and what they may do."""

    id: str
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """A key as listed (never its secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a token: ``key`` when accepted; otherwise why not (malformed, unknown, revoked)."""

    key: ApiKey | None
    reason: str = "ok"


@dataclass(frozen=True, slots=True)
class _Row:
    key: ApiKey
    secret_hash: str
    revoked: bool


class ApiKeys:
    """The API keys in one store. Thread-safe: the API checks keys from its reader threads."""

    def __init__(self, store: SqliteStore, *, now: Callable[[], datetime] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, cache_seconds: float = CACHE_SECONDS) -> None:
        self.store = store
        self._now = now or (lambda: datetime.now(UTC))
        self._monotonic = monotonic
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, _Row | None]] = {}  # id -> (loaded at, row or None when unknown)
        self._touched: dict[str, float] = {}  # id -> when last_used_at was last written (monotonic)

    # -- administration -----------------------------------------------------------------------------------------
    def create(self, name: str, scopes: Iterable[str]) -> str:
        """Store a new key; returns the full key, which exists nowhere else afterwards."""
        wanted = tuple(dict.fromkeys(scopes))
        if not _NAME_RE.match(name):
            raise ConfigError(f"{name[:80]!r} is not a valid API key name", key="invalid_api_key_name",
                              remedy="use 1 to 64 letters, digits, spaces and . _ @ : / + - (e.g. 'lobby display')")
        unknown = [s for s in wanted if s not in SCOPES]
        if not wanted or unknown:
            raise ConfigError(f"unknown scope(s): {', '.join(unknown)}" if unknown else "an API key needs a scope",
                              key="invalid_scope", remedy=f"give one or more of --scope {', '.join(SCOPES)}")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO api_keys (id, name, scopes, secret_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                         (key_id, name, ",".join(wanted), _hash(secret), _ts(self._now())))
        with self._lock:
            self._cache.pop(key_id, None)
        return f"{PREFIX}{key_id}_{secret}"

    def list(self) -> builtins.list[ApiKeyInfo]:
        with self.store.reading() as conn:
            rows = conn.execute("SELECT id, name, scopes, created_at, last_used_at, revoked_at FROM api_keys "
                                "ORDER BY created_at, id").fetchall()
        return [ApiKeyInfo(r[0], r[1], tuple(s for s in r[2].split(",") if s), _parse_ts(r[3]),
                           _parse_ts(r[4]) if r[4] else None, _parse_ts(r[5]) if r[5] else None) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """Refuse the key from now on (idempotent). False when there is no key with this id."""
        with self.store.transaction() as conn:
            found = conn.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if found is not None and found[0] is None:
                conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (_ts(self._now()), key_id))
        with self._lock:
            self._cache.pop(key_id, None)
        return found is not None

    # -- verification -------------------------------------------------------------------------------------------
    def verify(self, token: str) -> ApiKey | None:
        """The key, if the token is a valid, unrevoked key. May read the store (call it off the event loop)."""
        verdict = self.check(token)
        return verdict.key if verdict is not None else None

    def check(self, token: str, *, load: bool = True) -> Verdict | None:
        """Like verify, with the reason of a refusal. With ``load=False`` it never touches the store and returns
        None when the answer is not in the cache (so an event loop can try the cache first)."""
        parsed = _parse(token)
        if parsed is None:
            return Verdict(None, "malformed")
        key_id, secret = parsed
        now = self._monotonic()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            row = cached[1]
        elif not load:
            return None
        else:
            row = self._load(key_id)
            with self._lock:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[key_id] = (now, row)
        # Compare even when the id is unknown, so timing does not tell which ids exist.
        matches = hmac.compare_digest(_hash(secret), row.secret_hash if row else _DUMMY_HASH)
        if row is None or not matches:
            return Verdict(None, "unknown")
        if row.revoked:
            return Verdict(None, "revoked")
        return Verdict(row.key)

    def use_due(self, key_id: str) -> bool:
        """Whether ``last_used_at`` should be written for this key now; True at most once per TOUCH_SECONDS."""
        now = self._monotonic()
        with self._lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < TOUCH_SECONDS:
                return False
            if len(self._touched) >= CACHE_ENTRIES:
                self._touched.clear()
            self._touched[key_id] = now
            return True

    def record_use(self, key_id: str) -> None:
        """Write ``last_used_at`` (a store write: call it off the event loop, when use_due said so)."""
        with self.store.transaction() as conn:
            conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_ts(self._now()), key_id))

    def _load(self, key_id: str) -> _Row | None:
        with self.store.reading() as conn:
            r = conn.execute("SELECT name, scopes, secret_hash, revoked_at FROM api_keys WHERE id = ?",
                             (key_id,)).fetchone()
        if r is None:
            return None
        scopes = frozenset(s for s in r[1].split(",") if s)
        return _Row(ApiKey(key_id, r[0], scopes), r[2], r[3] is not None)


def key_id_of(token: str) -> str | None:
    """The id part of a key (safe to log), or None when the text is not shaped like a key."""
    parsed = _parse(token)
    return parsed[0] if parsed else None


def _parse(token: str) -> tuple[str, str] | None:
    if not token.startswith(PREFIX):
        return None
    key_id, _, secret = token[len(PREFIX):].partition("_")
    if not _ID_RE.match(key_id) or not _SECRET_RE.match(secret):
        return None
    return key_id, secret


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
