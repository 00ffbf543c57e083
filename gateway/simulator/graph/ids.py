"""Graph's ids: an event id names one mailbox's copy (and, for an instance of a series, its original start);
a user or place id is a GUID. Event ids are base64url like the real ``AAMkAG...`` ones and carry a checksum, so a
mangled or foreign id is not found rather than naming another item."""

from __future__ import annotations

import base64
import binascii
import struct
import uuid
import zlib
from datetime import UTC, datetime

_PREFIX = b"AAMkAGI2"  # cosmetic: real Exchange Online event ids start this way
_NAMESPACE = uuid.UUID("5c1d0f7e-3a55-4e4b-9a8e-7f0c2b6d1a90")


def event_id(mailbox_idx: int, iid: int, original_start: datetime | None = None) -> str:
    stamp = int(original_start.timestamp()) if original_start is not None else 0
    raw = struct.pack(">IIq", mailbox_idx, iid, stamp)
    return base64.urlsafe_b64encode(_PREFIX + raw + struct.pack(">I", zlib.crc32(raw))).decode().rstrip("=")


def parse_event_id(value: str) -> tuple[int, int, datetime | None] | None:
    """(mailbox index, item id, original start or None), or None when ``value`` is no id of ours."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != len(_PREFIX) + 20 or not raw.startswith(_PREFIX):
        return None
    body = raw[len(_PREFIX):-4]
    if zlib.crc32(body) != struct.unpack(">I", raw[-4:])[0]:
        return None
    mailbox_idx, iid, stamp = struct.unpack(">IIq", body)
    return mailbox_idx, iid, datetime.fromtimestamp(stamp, UTC) if stamp else None


def object_id(smtp: str) -> str:
    """A directory object's id (user, room, room list): a GUID stable for its address."""
    return str(uuid.uuid5(_NAMESPACE, smtp.lower()))
