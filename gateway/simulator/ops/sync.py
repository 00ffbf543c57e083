"""SyncFolderItems: incremental item sync of one folder, newest change first, with an opaque SyncState.

Every change bumps the mailbox's sequence number and stamps the item (``seq``, ``created_seq``); deletions leave
a tombstone in the folder. A SyncState carries the folder, the sequence the client has everything up to, and,
while a round of paging is under way, the window still to deliver:

    base      the client has every change with seq <= base
    top       the mailbox seq when this round started (changes after it belong to the next round)
    below     the changes in (base, below) are still to come in this round; those in [below, top] were sent

A round returns changes newest first, at most MaxChangesReturned per page, with IncludesLastItemInRange=false
until the window is empty; the next round starts at base=top. An item created since ``base`` is a Create (even
if modified since); one created and deleted since ``base`` is not reported at all; anything else is an Update
or a Delete. Only masters and single items are items: an edit to one occurrence moves its master's seq, so it
shows up as an Update of the master, as on Exchange ("SyncFolderItems does not include any calendaring logic").
ReadFlagChange is never produced (calendar items have no read state worth syncing).

The state is base64 of a versioned binary record with a MAC under a per-directory key: a corrupt, truncated or
other-folder state, or one from another simulator instance, is ErrorInvalidSyncStateData.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import weakref
from typing import Any

from lxml import etree

from gateway.simulator import ids
from gateway.simulator.calendar import CalendarItem
from gateway.simulator.itemxml import Shape, View, check_shape, item_text, render
from gateway.simulator.mailboxes import Directory, Folder
from gateway.simulator.ops import Context, operation
from gateway.simulator.ops.folders import resolve_folder
from gateway.simulator.schema import MNS
from gateway.simulator.soap import EwsError, Responses, fragment, sub

_MAGIC = b"SFI\x01"
_RECORD = struct.Struct(">4sIHQQQ")  # magic, mailbox idx, folder no, base, top, below
_MAC_LEN = 16
_KEYS: weakref.WeakKeyDictionary[Directory, bytes] = weakref.WeakKeyDictionary()
INVALID_STATE_TEXT = "Synchronization state data is corrupt or otherwise invalid."


def _key(directory: Directory) -> bytes:
    key = _KEYS.get(directory)
    if key is None:
        key = _KEYS[directory] = secrets.token_bytes(32)
    return key


def encode_state(directory: Directory, folder: Folder, base: int, top: int = 0, below: int = 0) -> str:
    record = _RECORD.pack(_MAGIC, folder.mailbox.idx, folder.no, base, top, below)
    mac = hmac.new(_key(directory), record, hashlib.sha256).digest()[:_MAC_LEN]
    return base64.b64encode(record + mac).decode()


def decode_state(directory: Directory, folder: Folder, value: str) -> tuple[int, int, int]:
    """(base, top, below) of a state the client got for ``folder``; ErrorInvalidSyncStateData otherwise."""
    invalid = EwsError("ErrorInvalidSyncStateData", INVALID_STATE_TEXT)
    try:
        raw = base64.b64decode(value.strip().encode(), validate=True)
    except (binascii.Error, ValueError):
        raise invalid from None
    if len(raw) != _RECORD.size + _MAC_LEN:
        raise invalid
    record, mac = raw[:_RECORD.size], raw[_RECORD.size:]
    if not hmac.compare_digest(mac, hmac.new(_key(directory), record, hashlib.sha256).digest()[:_MAC_LEN]):
        raise invalid
    magic, mb_idx, folder_no, base, top, below = _RECORD.unpack(record)
    if magic != _MAGIC or mb_idx != folder.mailbox.idx or folder_no != folder.no:
        raise invalid  # a state of another folder (or mailbox)
    seq = folder.mailbox.seq
    if base > seq or top > seq or (top and not base <= below - 1 <= top):
        raise invalid
    return int(base), int(top), int(below)


Change = tuple[int, str, Any]  # (sort key, Create/Update/Delete, CalendarItem or deleted iid)


def changes(folder: Folder, base: int, top: int, below: int) -> list[Change]:
    """The changes of the window (base, below) of a round that started at ``top``, newest first."""
    out: list[Change] = []
    for item in folder.items.values():
        if item.seq <= top:
            key = item.seq
        elif base < item.created_seq <= top:
            key = item.created_seq  # created in this round, changed again since: still owed as a Create
        else:
            continue  # changed after the round started: the next round reports it
        if base < key < below:
            out.append((key, "Create" if item.created_seq > base else "Update", item))
    for deleted_seq, iid, created_seq in folder.tombstones:
        if base < deleted_seq < below and deleted_seq <= top and created_seq <= base:
            out.append((deleted_seq, "Delete", iid))
    out.sort(key=lambda c: c[0], reverse=True)
    return out


def _ignored(folder: Folder, el: etree._Element | None) -> set[int]:
    """The iids of the folder's mailbox named in m:Ignore (ids of other mailboxes cannot match anything)."""
    found: set[int] = set()
    for ref in el if el is not None else []:
        if etree.QName(ref).localname == "ItemId":
            mb_idx, iid = ids.parse_item_id(ref.get("Id", ""))
            if mb_idx == folder.mailbox.idx:
                found.add(iid)
    return found


def _error(out: Responses, err: EwsError) -> None:
    # As Exchange answers (syncfolderitems-operation.md): an empty SyncState and IncludesLastItemInRange=true
    # follow the error. exchangelib reads both unconditionally before it looks at the ResponseCode.
    msg = out.error(err)
    sub(msg, "m:SyncState", "")
    sub(msg, "m:IncludesLastItemInRange", True)


@operation("SyncFolderItems")
async def sync_folder_items(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("SyncFolderItems")
    d: Directory = ctx.directory
    shape = Shape.parse(body.find(f"{{{MNS}}}ItemShape"))
    try:
        check_shape(shape)
        target = body.find(f"{{{MNS}}}SyncFolderId")
        assert target is not None and len(target) == 1
        try:
            folder = resolve_folder(ctx, target[0])
        except EwsError as e:
            if e.code != "ErrorFolderNotFound":
                raise
            raise EwsError("ErrorSyncFolderNotFound", "The specified folder could not be found for "
                                                      "synchronization.") from None
        state_text = (body.findtext(f"{{{MNS}}}SyncState") or "").strip()
        base, top, below = decode_state(d, folder, state_text) if state_text else (0, 0, 0)
        ignore = _ignored(folder, body.find(f"{{{MNS}}}Ignore"))
        max_changes = int((body.findtext(f"{{{MNS}}}MaxChangesReturned") or "0").strip())
    except EwsError as e:
        if e.fault:
            raise
        _error(out, e)
        return out.root
    if not top:  # a new round: everything up to now
        top = folder.mailbox.seq
        below = top + 1
    pending = [c for c in changes(folder, base, top, below)
               if not (c[1] == "Delete" and c[2] in ignore)
               and not (c[1] != "Delete" and c[2].iid in ignore)]
    page = pending[:max_changes]
    complete = len(pending) <= max_changes
    # Complete: the next round starts at top. Otherwise the rest of this round lies below the last change sent.
    new_state = encode_state(d, folder, top) if complete else encode_state(d, folder, base, top, page[-1][0])
    msg = out.success()
    sub(msg, "m:SyncState", new_state)
    sub(msg, "m:IncludesLastItemInRange", complete)
    container = sub(msg, "m:Changes")
    texts: list[str] = []  # changes written as text (itemxml.render_fast), spliced in as one fragment
    for _, kind, what in page:
        if kind == "Delete":
            texts.append(f'<t:Delete><t:ItemId Id="{ids.item_id(folder.mailbox.idx, int(what))}"/></t:Delete>')
            continue
        item: CalendarItem = what
        text = item_text(View(item, None, d), shape)
        if text is not None:
            texts.append(f"<t:{kind}>{text}</t:{kind}>")
            continue
        if texts:
            fragment(container, "".join(texts))
            texts = []
        render(sub(container, f"t:{kind}"), View(item, None, d), shape)
    if texts:
        fragment(container, "".join(texts))
    return out.root

