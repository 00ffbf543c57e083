"""Opaque, case-sensitive ids in Exchange's style: ItemId, OccurrenceItemId, ChangeKey, FolderId.

They are base64 like the real ones and carry a checksum, so a mangled id is refused with ErrorInvalidIdMalformed
instead of silently naming another item.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

from gateway.simulator.soap import EwsError

_ITEM, _OCCURRENCE, _FOLDER = 1, 2, 3
_PREFIX = b"AAMkA"  # real Exchange ids start with AAMkA...; purely cosmetic


def _pack(kind: int, a: int, b: int, c: int = 0) -> str:
    raw = struct.pack(">BIIH", kind, a, b, c)
    return base64.b64encode(_PREFIX + raw + struct.pack(">I", zlib.crc32(raw))).decode()


def _unpack(value: str, kind: int) -> tuple[int, int, int]:
    try:
        raw = base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EwsError("ErrorInvalidIdMalformed", "Id is malformed.") from e
    if len(raw) != len(_PREFIX) + 15 or not raw.startswith(_PREFIX):
        raise EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    body, crc = raw[len(_PREFIX):-4], struct.unpack(">I", raw[-4:])[0]
    if zlib.crc32(body) != crc:
        raise EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    k, a, b, c = struct.unpack(">BIIH", body)
    if k != kind:
        raise EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    return a, b, c


def item_id(mailbox_idx: int, iid: int) -> str:
    return _pack(_ITEM, mailbox_idx, iid)


def parse_item_id(value: str) -> tuple[int, int]:
    a, b, _ = _unpack(value, _ITEM)
    return a, b


def occurrence_id(mailbox_idx: int, master_iid: int, index: int) -> str:
    """The synthetic id a CalendarView gives an occurrence (not stable across series edits, as in Exchange)."""
    return _pack(_OCCURRENCE, mailbox_idx, master_iid, index)


def parse_occurrence_id(value: str) -> tuple[int, int, int]:
    return _unpack(value, _OCCURRENCE)


def is_occurrence_id(value: str) -> bool:
    try:
        _unpack(value, _OCCURRENCE)
        return True
    except EwsError:
        return False


def folder_id(mailbox_idx: int, folder_no: int) -> str:
    return _pack(_FOLDER, mailbox_idx, folder_no)


def parse_folder_id(value: str) -> tuple[int, int]:
    a, b, _ = _unpack(value, _FOLDER)
    return a, b


def change_key(iid: int, version: int) -> str:
    return base64.b64encode(b"DwAAABYA" + struct.pack(">II", iid, version)).decode()


def parse_change_key(value: str) -> tuple[int, int] | None:
    try:
        raw = base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 or not raw.startswith(b"DwAAABYA"):
        return None
    iid, version = struct.unpack(">II", raw[8:])
    return iid, version
