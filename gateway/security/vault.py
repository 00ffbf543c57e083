"""The credential vault: one encrypted file of named secrets, whose key is kept somewhere else.

The file is JSON, so anyone can see what it is without the key::

    {"format": "exchange-room-gateway/vault", "version": 1, "cipher": "AES-256-GCM",
     "key_id": "<16 hex>", "nonce": "<base64>", "ciphertext": "<base64>"}

The ciphertext is the whole set of entries (``{"entries": {name: {"value": ..., "updated_at": ...}}}``), so
entry names are confidential too and the file is one authenticated unit: no entry can be swapped, dropped or
edited on its own. Rolling the whole file back to an older copy is not detectable (nothing outside the file
remembers a version).

Why AES-256-GCM (``cryptography``'s AESGCM) and not Fernet: both are sound. GCM authenticates *associated
data*, so the header (format, version, cipher, key id) is bound to the ciphertext and cannot be altered
without detection; the key is 256 bits; nothing is stored in the clear (Fernet tokens carry a plaintext
timestamp). A fresh random 96-bit nonce per write is safe here: a vault is rewritten a handful of times in its
life, many orders of magnitude below the 2**32 writes where random nonces would become a concern.

The key id is an HMAC of a fixed label under the key. It reveals nothing about the key, and it tells "this
vault was written with a different key" (a configuration mistake) apart from "this vault was modified"
(tampering or corruption), which GCM alone reports identically.

Writes are atomic: a temporary file in the same directory, fsync, rename over the old file, fsync of the
directory; the old vault stays intact if anything fails before the rename. Files are created with mode 0600;
writers take an advisory lock so two ``gateway credentials set`` runs cannot lose each other's entry.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ConfigError
from gateway.security import permissions
from gateway.security.secret import NAME_RE, Secret

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX; the appliance runs on Linux
    fcntl = None  # type: ignore[assignment]

log = structlog.get_logger("gateway.security.vault")

FORMAT = "exchange-room-gateway/vault"
VERSION = 1
CIPHER = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID_LABEL = b"exchange-room-gateway vault key id v1"
_HEADER_FIELDS = ("format", "version", "cipher", "key_id")


# -- the key ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VaultKey:
    """The 256-bit vault key and where it came from (for messages; never the key itself)."""

    material: bytes = field(repr=False)
    source: str  # "key file /etc/gateway/vault.key" or "environment variable GATEWAY_VAULT_KEY"

    @property
    def key_id(self) -> str:
        return hmac.new(self.material, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"VaultKey(source={self.source!r}, key_id={self.key_id!r})"


def new_key_text() -> str:
    """A fresh random key as text (base64url of 32 bytes, 44 characters): what a key file or variable holds."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def generate_key_file(path: Path) -> Path:
    """Write a new random key to ``path`` with mode 0600. Never overwrites: losing a key loses the vault."""
    path = Path(path)
    try:
        _make_private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"a key file already exists at {path}",
                          key="vault_key_exists",
                          remedy="keep it: the vault can only be read with the key that wrote it") from None
    except OSError as e:
        raise ConfigError(f"cannot create the vault key file {path}: {e.strerror}",
                          remedy=f"check that the gateway may write to {path.parent}") from None
    try:
        os.fchmod(fd, 0o600)  # in case the umask or the filesystem widened it
        os.write(fd, (new_key_text() + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    _fsync_dir(path.parent)
    return path


def parse_key(text: str, source: str) -> VaultKey:
    """A key from its text form (base64 or base64url of 32 bytes). The text is never put in a message."""
    compact = "".join(text.split())
    try:
        material = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        material = b""
    if len(material) != KEY_BYTES:
        raise ConfigError(f"the vault key from {source} is not a valid key (expected {KEY_BYTES} random bytes, "
                          "base64-encoded: 44 characters)", key="vault_key_invalid",
                          remedy="restore the key exactly as it was generated; a new key cannot read an "
                                 "existing vault")
    return VaultKey(material, source)


def read_key_file(path: Path) -> VaultKey:
    path = Path(path)
    source = f"key file {path}"
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"there is no vault key file at {path}", key="vault_key_missing",
                          remedy="restore the key file, or point vault.key_file (or vault.key_env) at the key") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the vault key file {path}: {getattr(e, 'strerror', None) or 'not text'}",
                          key="vault_key_invalid",
                          remedy="check the file and that the gateway's user may read it") from None
    _warn_if_shared(path, "vault.key_permissions_too_open")
    return parse_key(text, source)


def key_from_env(name: str, env: Mapping[str, str]) -> VaultKey:
    text = env.get(name)
    if not text:
        raise ConfigError(f"the environment variable {name} (vault.key_env) is not set", key="vault_key_missing",
                          remedy=f"set {name} to the vault key (for example from a Kubernetes Secret)")
    return parse_key(text, f"environment variable {name}")


# -- the vault -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VaultEntry:
    name: str
    updated_at: str  # ISO 8601, UTC


class Vault:
    """Named secrets in one encrypted file. Every call reads the file afresh; it is tiny."""

    def __init__(self, path: Path, key: VaultKey) -> None:
        self.path = Path(path)
        self.key = key

    def __repr__(self) -> str:
        return f"Vault({str(self.path)!r}, {self.key!r})"

    # -- reading ---------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists()

    def entries(self) -> list[VaultEntry]:
        return [VaultEntry(name, e["updated_at"]) for name, e in sorted(self._load().items())]

    def names(self) -> list[str]:
        return sorted(self._load())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._load()

    def get(self, name: str) -> Secret:
        _check_name(name)
        if not self.path.exists():
            raise ConfigError(f"there is no vault at {self.path} yet, so it has no entry '{name}'",
                              key="credential_missing", remedy=f"store it with `gateway credentials set {name}`")
        entry = self._load().get(name)
        if entry is None:
            raise ConfigError(f"the vault at {self.path} has no entry '{name}'", key="credential_missing",
                              remedy=f"store it with `gateway credentials set {name}`")
        return Secret(entry["value"])

    # -- writing ---------------------------------------------------------------------------------------------
    def set(self, name: str, value: Secret | str) -> None:
        _check_name(name)
        secret = value if isinstance(value, Secret) else Secret(value)
        with self._locked():
            entries = self._load()
            entries[name] = {"value": secret.reveal(), "updated_at": _now()}
            self._save(entries)

    def delete(self, name: str) -> bool:
        """Remove an entry; False if there was none."""
        _check_name(name)
        with self._locked():
            entries = self._load()
            if name not in entries:
                return False
            del entries[name]
            self._save(entries)
            return True

    # -- the file --------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, str]]:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ConfigError(f"cannot read the vault {self.path}: {e.strerror}",
                              remedy="check that the gateway's user may read it") from None
        _warn_if_shared(self.path, "vault.permissions_too_open")
        return self._open(blob)

    def _open(self, blob: bytes) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(blob)
            header = {k: doc[k] for k in _HEADER_FIELDS}
            nonce = base64.b64decode(doc["nonce"], validate=True)
            ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
        except (ValueError, KeyError, TypeError):
            raise self._damaged("is not a readable vault file") from None
        if header["format"] != FORMAT:
            raise self._damaged("is not a gateway vault file")
        if header["version"] != VERSION:
            raise ConfigError(f"the vault at {self.path} has format version {header['version']!r}, which this "
                              "gateway does not understand", key="vault_version",
                              remedy="run the gateway version that wrote it, or a newer one")
        if header["key_id"] != self.key.key_id:
            raise ConfigError(f"the vault at {self.path} was encrypted with a different key than the one from "
                              f"{self.key.source}", key="vault_key_mismatch",
                              remedy="point vault.key_file (or vault.key_env) at the key this vault was created "
                                     "with; if that key is lost, delete the vault and store every credential "
                                     "again with `gateway credentials set NAME`")
        try:
            plaintext = AESGCM(self.key.material).decrypt(nonce, ciphertext, _canonical(header))
        except (InvalidTag, ValueError):
            raise self._damaged("failed its integrity check: it was modified or damaged") from None
        try:
            entries = json.loads(plaintext)["entries"]
            ok = isinstance(entries, dict) and all(
                isinstance(e, dict) and isinstance(e.get("value"), str) and isinstance(e.get("updated_at"), str)
                for e in entries.values())
        except (ValueError, KeyError, TypeError):
            ok = False  # `from None` below: the decrypted text must not ride along on an exception
        if not ok:
            raise self._damaged("decrypted to something that is not a list of entries")
        return {str(name): {"value": e["value"], "updated_at": e["updated_at"]} for name, e in entries.items()}

    def _damaged(self, what: str) -> ConfigError:
        return ConfigError(f"the vault at {self.path} {what}", key="vault_tampered",
                           remedy="restore the vault from a backup, or delete it and store every credential "
                                  "again with `gateway credentials set NAME`")

    def _seal(self, entries: Mapping[str, Mapping[str, str]]) -> bytes:
        header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "key_id": self.key.key_id}
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps({"entries": entries}, sort_keys=True).encode("utf-8")
        ciphertext = AESGCM(self.key.material).encrypt(nonce, plaintext, _canonical(header))
        doc = {**header, "nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(ciphertext).decode()}
        return (json.dumps(doc, indent=1) + "\n").encode("ascii")

    def _save(self, entries: Mapping[str, Mapping[str, str]]) -> None:
        try:
            atomic_write(self.path, self._seal(entries))
        except OSError as e:
            raise ConfigError(f"cannot write the vault {self.path}: {e.strerror or e}",
                              key="vault_unwritable",
                              remedy=f"check free space and that the gateway may write to {self.path.parent}; "
                                     "the previous vault is unchanged") from None
        log.info("vault.written", path=str(self.path), entries=len(entries))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An advisory lock beside the vault, held across read-modify-write (two writers lose nothing)."""
        lock_path = self.path.parent / f".{self.path.name}.lock"
        try:
            _make_private_dir(self.path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if fcntl is not None else -1
        except OSError as e:
            raise ConfigError(f"cannot write beside the vault {self.path}: {e.strerror or e}", key="vault_unwritable",
                              remedy=f"check that the gateway may write to {self.path.parent}") from None
        if fd < 0:  # pragma: no cover - not POSIX
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


# -- file plumbing ---------------------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a mixture."""
    path = Path(path)
    _make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory that holds the entry (not possible everywhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _make_private_dir(directory: Path) -> None:
    if not directory.exists():
        with permissions.private_umask():  # missing parents too: 0700, not 0755
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _warn_if_shared(path: Path, event: str) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:  # pragma: no cover
        return
    if mode & 0o077:
        log.warning(event, path=str(path), mode=oct(mode),
                    remedy=f"chmod 600 {path} (for a Kubernetes Secret volume: defaultMode: 0400)")


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{name!r} is not a valid credential name", key="invalid_credential_name",
                          remedy="use letters, digits, '.', '_' and '-' (up to 64 characters), e.g. exchange")


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
