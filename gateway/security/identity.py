"""The gateway's relay identity: an Ed25519 key pair it generated itself, kept in the encrypted vault.

The private key is made here, is stored only inside the vault (encrypted with the vault key, like the Exchange
password) and never leaves the process: nothing in this module returns or prints it. The hub only ever sees the
public key (at ``gateway enroll``) and signatures (one per connection, over a fresh challenge).

Everything lives in ONE vault entry, ``relay-identity``, a JSON document::

    {"version": 1, "gateway_id": "gw_…" | null, "customer": "…" | null, "hub_url": "wss://…/v1/tunnel" | null,
     "enrolled_at": "…" | null,
     "key":  {"private": "<base64url of the raw 32-byte seed>", "key_id": "k_…", "created_at": "…"},
     "next": {… the same, while a rotation is under way …} | null}

One entry rather than separate ``relay-key`` / ``relay-key-next`` / metadata entries because the vault writes one
entry per call: a rotation (next becomes current, next cleared) must be a single atomic write, or a crash between
two writes could leave the gateway without a key the hub knows. The vault encrypts the entry as a whole, so the
metadata is confidential too (the gateway id is no secret, but nothing is gained by showing it).

Rotation without downtime: ``begin_rotation()`` stores a next key beside the current one (both survive a
restart); the tunnel sends the next key's public part signed by it; when the hub answers ``key_rotated``,
``commit_rotation()`` makes it current. Until then the current key keeps working, and if the gateway restarts
after the hub switched but before it committed, the tunnel answers the next challenge with the next key.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import ConfigError, ProtocolError
from gateway.relay import protocol
from gateway.security.secret import Secret
from gateway.security.vault import Vault

log = structlog.get_logger(__name__)

ENTRY: Final = "relay-identity"
FORMAT_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class PublicKey:
    """The shareable half of a key: what the hub stores."""

    public_key_b64: str  # protocol.b64 of the raw 32 bytes
    key_id: str  # protocol.key_id_for(raw)
    created_at: datetime


@dataclass(frozen=True, slots=True, repr=False)
class _Key:
    private: Ed25519PrivateKey
    public: PublicKey

    def __repr__(self) -> str:  # never the private half
        return f"_Key(key_id={self.public.key_id!r})"

    @classmethod
    def new(cls, now: datetime) -> _Key:
        return cls.from_private(Ed25519PrivateKey.generate(), now)

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey, created_at: datetime) -> _Key:
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private, PublicKey(protocol.b64(raw), protocol.key_id_for(raw), created_at))

    def to_doc(self) -> dict[str, str]:
        seed = self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        return {"private": base64.urlsafe_b64encode(seed).decode("ascii"), "key_id": self.public.key_id,
                "created_at": _iso(self.public.created_at)}

    @classmethod
    def from_doc(cls, doc: Any) -> _Key:
        seed = base64.urlsafe_b64decode(doc["private"])
        key = cls.from_private(Ed25519PrivateKey.from_private_bytes(seed), _parse(doc["created_at"]))
        if key.public.key_id != doc["key_id"]:
            raise ValueError("key id does not match the key")
        return key


@dataclass(frozen=True, slots=True, repr=False)
class _State:
    key: _Key
    next: _Key | None = None
    gateway_id: str | None = None
    customer: str | None = None
    hub_url: str | None = None
    enrolled_at: datetime | None = None

    def to_json(self) -> str:
        return json.dumps({
            "version": FORMAT_VERSION, "gateway_id": self.gateway_id, "customer": self.customer,
            "hub_url": self.hub_url, "enrolled_at": _iso(self.enrolled_at) if self.enrolled_at else None,
            "key": self.key.to_doc(), "next": self.next.to_doc() if self.next else None}, sort_keys=True)


class GatewayIdentity:
    """The gateway's key pair(s) and enrollment, backed by one vault entry. Thread-safe (the tunnel calls the
    writing methods from a worker thread: vault writes fsync)."""

    def __init__(self, vault: Vault, state: _State, *, entry: str = ENTRY) -> None:
        self._vault = vault
        self._state = state
        self._entry = entry
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        s = self._state
        return (f"GatewayIdentity(gateway_id={s.gateway_id!r}, key_id={s.key.public.key_id!r}, "
                f"rotating={s.next is not None})")

    # -- making and finding one -----------------------------------------------------------------------------
    @classmethod
    def generate(cls, vault: Vault, *, entry: str = ENTRY) -> GatewayIdentity:
        """A new key pair, in memory only and not enrolled; ``enroll()`` stores it once the hub accepted it."""
        return cls(vault, _State(_Key.new(_now())), entry=entry)

    @classmethod
    def exists(cls, vault: Vault, *, entry: str = ENTRY) -> bool:
        return vault.exists() and entry in vault

    @classmethod
    def load(cls, vault: Vault, *, entry: str = ENTRY) -> GatewayIdentity:
        """The stored identity; ConfigError ``relay_not_enrolled`` when there is none."""
        if not cls.exists(vault, entry=entry):
            raise ConfigError(f"this gateway has no relay identity in the vault at {vault.path}",
                              key="relay_not_enrolled",
                              remedy="enroll it once with `gateway enroll --hub https://HUB --token TOKEN`")
        return cls(vault, _read(vault, entry), entry=entry)

    def reload(self) -> None:
        """Read the vault again (another process, e.g. ``gateway enroll --force``, may have replaced it)."""
        state = _read(self._vault, self._entry)
        with self._lock:
            self._state = state

    def enroll(self, *, gateway_id: str, customer: str | None, hub_url: str | None) -> None:
        """Record what the hub answered to the enrollment and store the identity (replacing any earlier one)."""
        with self._lock:
            state = replace(self._state, gateway_id=gateway_id, customer=customer, hub_url=hub_url,
                            enrolled_at=_now())
            self._save(state)
        log.info("identity.enrolled", gateway_id=gateway_id, customer=customer, key_id=state.key.public.key_id)

    # -- what it is -----------------------------------------------------------------------------------------
    @property
    def enrolled(self) -> bool:
        return self._state.gateway_id is not None

    @property
    def gateway_id(self) -> str:
        if self._state.gateway_id is None:
            raise ConfigError("this gateway is not enrolled at a hub yet", key="relay_not_enrolled",
                              remedy="enroll it once with `gateway enroll --hub https://HUB --token TOKEN`")
        return self._state.gateway_id

    @property
    def customer(self) -> str | None:
        return self._state.customer

    @property
    def hub_url(self) -> str | None:
        return self._state.hub_url

    @property
    def enrolled_at(self) -> datetime | None:
        return self._state.enrolled_at

    @property
    def public_key(self) -> PublicKey:
        return self._state.key.public

    @property
    def public_key_b64(self) -> str:
        return self._state.key.public.public_key_b64

    @property
    def key_id(self) -> str:
        return self._state.key.public.key_id

    @property
    def key_created_at(self) -> datetime:
        return self._state.key.public.created_at

    @property
    def next_key(self) -> PublicKey | None:
        """The key a rotation under way will switch to (None when no rotation is pending)."""
        n = self._state.next
        return n.public if n else None

    # -- using it -------------------------------------------------------------------------------------------
    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature by the current key."""
        return self._state.key.private.sign(data)

    def sign_with(self, key_id: str, data: bytes) -> bytes:
        """A signature by the current or the pending next key, chosen by id (rotation, handshake fallback)."""
        state = self._state
        for key in (state.key, state.next):
            if key is not None and key.public.key_id == key_id:
                return key.private.sign(data)
        raise KeyError(f"no key {key_id!r} in this identity")

    # -- rotating it ----------------------------------------------------------------------------------------
    def begin_rotation(self) -> PublicKey:
        """A next key, stored beside the current one (an unfinished rotation keeps its next key: the hub may
        already know it). Returns its public part, to send to the hub."""
        with self._lock:
            if self._state.next is None:
                self._save(replace(self._state, next=_Key.new(_now())))
                log.info("identity.rotation_started", key_id=self.key_id, next_key_id=self._next().public.key_id)
            return self._next().public

    def commit_rotation(self, key_id: str | None = None) -> bool:
        """Make the next key current (the hub confirmed it). With ``key_id``, only if that is the next key's id.
        Returns whether anything changed; committing twice is harmless."""
        with self._lock:
            nxt = self._state.next
            if nxt is None or (key_id is not None and nxt.public.key_id != key_id):
                return False
            old = self._state.key.public.key_id
            self._save(replace(self._state, key=nxt, next=None))
        log.info("identity.rotated", old_key_id=old, key_id=nxt.public.key_id)
        return True

    def abandon_rotation(self) -> None:
        """Drop a pending next key (the hub refused it)."""
        with self._lock:
            if self._state.next is not None:
                self._save(replace(self._state, next=None))

    # -- storage --------------------------------------------------------------------------------------------
    def _next(self) -> _Key:
        assert self._state.next is not None
        return self._state.next

    def _save(self, state: _State) -> None:
        self._vault.set(self._entry, Secret(state.to_json()))
        self._state = state


def _read(vault: Vault, entry: str) -> _State:
    text = vault.get(entry).reveal()
    try:
        doc = json.loads(text)
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {doc.get('version')!r}")
        key = _Key.from_doc(doc["key"])
        nxt = _Key.from_doc(doc["next"]) if doc.get("next") else None
        enrolled_at = _parse(doc["enrolled_at"]) if doc.get("enrolled_at") else None
        return _State(key, nxt, doc.get("gateway_id"), doc.get("customer"), doc.get("hub_url"), enrolled_at)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        # `from None`: the entry holds the private key; no part of it may ride along on the exception
        raise ConfigError(f"the vault entry '{entry}' is not a relay identity this gateway can read",
                          key="relay_identity_invalid",
                          remedy="enroll the gateway again with `gateway enroll --force --hub https://HUB --token "
                                 "TOKEN`") from None


def verify(public_key_b64: str, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` by that public key (for hubs and tests)."""
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(protocol.unb64(public_key_b64)).verify(signature, data)
    except (InvalidSignature, ValueError, ProtocolError):
        return False
    return True


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)
