"""Opaque, case-sensitive ids in Exchange's style: ItemId, OccurrenceItemId, ChangeKey, FolderId.

They are base64 like the real ones and carry a checksum, so a mangled id is refused with ErrorInvalidIdMalformed
instead of silently naming another item.
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
import zlib
from dataclasses import dataclass

from gateway.simulator.soap import EwsError

_ITEM, _OCCURRENCE, _FOLDER = 1, 2, 3
_PREFIX = b"AAMkA"  # real Exchange ids start with AAMkA...; purely cosmetic


def _pack(kind: int, a: int, b: int, c: int = 0) -> str:
    raw = struct.pack(">BIIH", kind, a, b, c)
    return binascii.b2a_base64(_PREFIX + raw + struct.pack(">I", zlib.crc32(raw)), newline=False).decode()


def _unpack(value: str, kind: int) -> tuple[int, int, int]:
    found = _try_unpack(value, kind)
    if found is None:
        raise EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    return found


def _try_unpack(value: str, kind: int) -> tuple[int, int, int] | None:
    try:
        raw = base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != len(_PREFIX) + 15 or not raw.startswith(_PREFIX):
        return None
    body, crc = raw[len(_PREFIX):-4], struct.unpack(">I", raw[-4:])[0]
    if zlib.crc32(body) != crc:
        return None
    k, a, b, c = struct.unpack(">BIIH", body)
    if k != kind:
        return None
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
    return _try_unpack(value, _OCCURRENCE) is not None  # asked of every ItemId a GetItem names: no exception


def folder_id(mailbox_idx: int, folder_no: int) -> str:
    return _pack(_FOLDER, mailbox_idx, folder_no)


def parse_folder_id(value: str) -> tuple[int, int]:
    a, b, _ = _unpack(value, _FOLDER)
    return a, b


@functools.lru_cache(maxsize=65536)  # every occurrence of a series carries its master's
def change_key(iid: int, version: int) -> str:
    return binascii.b2a_base64(b"DwAAABYA" + struct.pack(">II", iid, version), newline=False).decode()


def parse_change_key(value: str) -> tuple[int, int] | None:
    try:
        raw = base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 or not raw.startswith(b"DwAAABYA"):
        return None
    iid, version = struct.unpack(">II", raw[8:])
    return iid, version


# -- MAPI entry ids and the other forms ConvertId speaks ---------------------------------------------------------
# PR_ENTRYID as Exchange lays it out: 4 flag bytes (zero), the store's provider uid (16 bytes; here a constant
# prefix and the mailbox number), the object type (2), then the folder's database guid and 6-byte global counter
# (+2 pad) and, for a message, the message's (the same again). 46 bytes for a folder, 70 for a message. An EWS id
# here does not carry the item's folder, so a message's folder part is zero: the conversion stays a pure function
# of the id, as ConvertId is on Exchange.
_STORE_UID_PREFIX = bytes.fromhex("DCA740C8C042101AB4B908002B2FE182")[:12]
_DB_GUID = bytes.fromhex("7A1B5C3E9D0F4E21A6B8C4D2E0F19A37")
_FOLDER_TYPE, _MESSAGE_TYPE = 0x0001, 0x0007
_STORE_OBJECT_TYPE = {_FOLDER: 1, _ITEM: 9}  # the trailing type byte of a StoreId / OwaId
FORMATS = ("EwsLegacyId", "EwsId", "EntryId", "HexEntryId", "StoreId", "OwaId")
_LEGACY = 0x80  # EwsLegacyId: the same record, marked as the Exchange 2007 RTM form


@dataclass(frozen=True)
class StoreObject:
    """What an id names, whatever its form: a folder (``number`` = folder number) or an item (``number`` = iid)."""

    kind: int  # 1 item, 3 folder (as in the EWS ids above)
    mailbox: int
    number: int

    @property
    def is_folder(self) -> bool:
        return self.kind == _FOLDER


def folder_object(mailbox_idx: int, folder_no: int) -> StoreObject:
    return StoreObject(_FOLDER, mailbox_idx, folder_no)


def item_object(mailbox_idx: int, iid: int) -> StoreObject:
    return StoreObject(_ITEM, mailbox_idx, iid)


def _counter(n: int) -> bytes:
    return n.to_bytes(6, "big") + b"\x00\x00"


def entry_id(obj: StoreObject) -> bytes:
    """PR_ENTRYID of a folder or an item."""
    head = b"\x00" * 4 + _STORE_UID_PREFIX + struct.pack(">I", obj.mailbox)
    if obj.is_folder:
        return head + struct.pack("<H", _FOLDER_TYPE) + _DB_GUID + _counter(obj.number)
    return head + struct.pack("<H", _MESSAGE_TYPE) + _DB_GUID + _counter(0) + _DB_GUID + _counter(obj.number)


def parse_entry_id(raw: bytes) -> StoreObject:
    malformed = EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    if len(raw) not in (46, 70) or raw[:4] != b"\x00" * 4 or raw[4:16] != _STORE_UID_PREFIX:
        raise malformed
    mailbox = struct.unpack(">I", raw[16:20])[0]
    kind = struct.unpack("<H", raw[20:22])[0]
    if raw[22:38] != _DB_GUID:
        raise malformed
    folder_no = int.from_bytes(raw[38:44], "big")
    if len(raw) == 46 and kind == _FOLDER_TYPE:
        return StoreObject(_FOLDER, mailbox, folder_no)
    if len(raw) == 70 and kind == _MESSAGE_TYPE and raw[46:62] == _DB_GUID:
        return StoreObject(_ITEM, mailbox, int.from_bytes(raw[62:68], "big"))
    raise malformed


def format_id(obj: StoreObject, fmt: str) -> str:
    """``obj``'s id in ConvertId format ``fmt``."""
    if fmt in ("EwsId", "EwsLegacyId"):
        kind = obj.kind | (_LEGACY if fmt == "EwsLegacyId" else 0)
        return _pack(kind, obj.mailbox, obj.number)
    raw = entry_id(obj)
    if fmt == "EntryId":
        return base64.b64encode(raw).decode()
    if fmt == "HexEntryId":
        return raw.hex().upper()
    # StoreId and OwaId: the entry id with its length in front and the store object type after it.
    return base64.b64encode(struct.pack("<I", len(raw)) + raw + bytes([_STORE_OBJECT_TYPE[obj.kind]])).decode()


def parse_any_id(value: str, fmt: str) -> StoreObject:
    """The folder or item an id in ConvertId format ``fmt`` names."""
    malformed = EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
    if fmt in ("EwsId", "EwsLegacyId"):
        legacy = _LEGACY if fmt == "EwsLegacyId" else 0
        for kind in (_ITEM, _FOLDER):
            try:
                a, b, _ = _unpack(value, kind | legacy)
            except EwsError:
                continue
            return StoreObject(kind, a, b)
        if not legacy and is_occurrence_id(value):
            raise EwsError("ErrorInvalidIdMalformed",
                           "An occurrence id cannot be converted; convert its recurring master's id.")
        raise malformed
    try:
        raw = bytes.fromhex(value) if fmt == "HexEntryId" else base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    if fmt in ("StoreId", "OwaId"):
        if len(raw) < 5 or struct.unpack("<I", raw[:4])[0] != len(raw) - 5:
            raise malformed
        raw = raw[4:-1]
    return parse_entry_id(raw)
