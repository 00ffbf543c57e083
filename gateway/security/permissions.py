"""Private state on disk: the gateway's files are 0600 and its folders 0700.

The store holds bookings, organisers and API-key hashes; the vault holds secrets. Both are created private,
whatever the process umask. Existing files or folders that other users may read are reported (logged at start-up
and listed by ``gateway doctor``), never changed behind the operator's back: a backup group may have been given
read access on purpose.

A path the gateway cannot create or write is a configuration problem with one remedy: make the folder writable
by the user the gateway runs as, or point the setting somewhere else (``state_unwritable``).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.errors import ConfigError

log = structlog.get_logger("gateway.security.permissions")

FILE_MODE = 0o600
DIR_MODE = 0o700
_umask_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Loose:
    """An existing file or folder that users other than its owner may use."""

    path: Path
    mode: int
    is_dir: bool

    @property
    def remedy(self) -> str:
        return f"chmod {DIR_MODE if self.is_dir else FILE_MODE:o} {self.path}"

    @property
    def risk(self) -> str:
        return f"mode {self.mode:o}: other local users may " + \
            ("list and open what is inside" if self.is_dir else "read it")


def unwritable(path: Path, reason: object, setting: str) -> ConfigError:
    """The error for a state file or folder the gateway cannot create or write."""
    path = Path(path)
    text = getattr(reason, "strerror", None) or str(reason)
    blocker = _nearest_existing(path)
    if blocker is not None and not blocker.is_dir():
        remedy = f"{blocker} is a file, not a folder: move it away or set {setting} to another place"
    else:
        folder = path if path.is_dir() else blocker or path.parent
        remedy = (f"make {folder} (and the gateway's files in it) writable by uid {os.geteuid()}, the user the "
                  f"gateway runs as, or set {setting} to a writable place")
    return ConfigError(f"cannot create or write {path}: {text}", key="state_unwritable", remedy=remedy)


def _nearest_existing(path: Path) -> Path | None:
    """The deepest existing ancestor of ``path``: whose permissions decide whether it can be created."""
    for parent in path.parents:
        try:
            if parent.exists():
                return parent
        except OSError:
            continue
    return None


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders created inside are private whatever the umask: sqlite3 creates a database 0644 (under
    the usual umask 022) and its -wal and -shm files with the database's mode. The umask belongs to the process,
    so another thread creating a file meanwhile gets a private one too, which is never wrong here; the lock keeps
    two of these from restoring each other's value."""
    with _umask_lock:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


def make_private_dir(directory: Path, *, setting: str) -> None:
    """Create ``directory`` and any missing parents with mode 0700; an existing one is left as it is."""
    directory = Path(directory)
    if directory.is_dir():
        return
    try:
        with private_umask():
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(directory, e, setting) from None


def make_private(paths: Iterable[Path]) -> None:
    """Mode 0600 for each of ``paths`` that exists (just created: in case the file system ignored the umask)."""
    for path in paths:
        try:
            os.chmod(path, FILE_MODE)
        except FileNotFoundError:
            continue


def sqlite_files(database: Path) -> tuple[Path, Path, Path]:
    """The database and the two files SQLite keeps beside it in WAL mode."""
    return database, Path(f"{database}-wal"), Path(f"{database}-shm")


def loose(paths: Iterable[Path]) -> list[Loose]:
    """Those of ``paths`` that exist and give group or others any access (missing ones are skipped)."""
    found = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            found.append(Loose(Path(path), mode, stat.S_ISDIR(st.st_mode)))
    return found


def warn_if_loose(paths: Iterable[Path], event: str) -> list[Loose]:
    """Log one warning per file or folder in ``paths`` that others may use; returns them."""
    found = loose(paths)
    for item in found:
        log.warning(event, path=str(item.path), mode=f"{item.mode:o}", risk=item.risk, remedy=item.remedy)
    return found
