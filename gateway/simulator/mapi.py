"""Extended (MAPI) properties: how an ExtendedFieldURI names one, and the ones Exchange computes from an item's or
a folder's own state (PR_SUBJECT, PR_LAST_MODIFICATION_TIME, PR_CONTAINER_CLASS, PidLidRecurring, ...).

A property is (property set, id or name, type), as a MAPI property tag is id and type: the same id asked for
with another type is another property, and Exchange returns nothing for it. Properties a client stamps itself
(the gateway's command key, say) live in the item's ``ext`` dict; the computed ones below are never stored, so
they cannot disagree with what the item's XML fields say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lxml import etree

from gateway.simulator import ids

if TYPE_CHECKING:
    from gateway.simulator.itemxml import View
    from gateway.simulator.mailboxes import Folder

ExtKey = tuple[str, str, str]  # (property set, decimal id or name, PropertyType); "tag" is the set of tagged ones

PSETID_MEETING = "6ed8da90-450b-101b-98da-00aa003f1305"
PSETID_PUBLIC_STRINGS = "00020329-0000-0000-c000-000000000046"
# Property sets a client may name by GUID (PropertySetId) or by name (DistinguishedPropertySetId): one key for both.
SET_ALIASES = {
    PSETID_MEETING: "Meeting",
    PSETID_PUBLIC_STRINGS: "PublicStrings",
    "00062002-0000-0000-c000-000000000046": "Appointment",
    "00062008-0000-0000-c000-000000000046": "Common",
    "00062004-0000-0000-c000-000000000046": "Address",
    "00062003-0000-0000-c000-000000000046": "Task",
    "00020386-0000-0000-c000-000000000046": "InternetHeaders",
}


def ext_key(uri: etree._Element) -> ExtKey:
    """Normalise an ExtendedFieldURI to (property set, name or id, type)."""
    pset = uri.get("DistinguishedPropertySetId")
    if pset is None and uri.get("PropertySetId"):
        guid = uri.get("PropertySetId", "").strip("{}").lower()
        pset = SET_ALIASES.get(guid, guid)
    if uri.get("PropertyTag"):
        tag = uri.get("PropertyTag", "")
        num = int(tag, 16) if tag.lower().startswith("0x") else int(tag)
        return ("tag", str(num), uri.get("PropertyType", ""))
    name = uri.get("PropertyName")
    if name is None:
        pid = uri.get("PropertyId", "0")
        name = str(int(pid, 16) if pid.lower().startswith("0x") else int(pid))
    return (pset or "", name, uri.get("PropertyType", ""))


def _tag(num: int, ptype: str) -> ExtKey:
    return ("tag", str(num), ptype)


def _lid(pset: str, num: int, ptype: str) -> ExtKey:
    return (pset, str(num), ptype)


SENSITIVITY = {"Normal": 0, "Personal": 1, "Private": 2, "Confidential": 3}
BUSY_STATUS = {"Free": 0, "Tentative": 1, "Busy": 2, "OOF": 3, "WorkingElsewhere": 4, "NoData": 0}


def _subject(v: View) -> str:
    return v.inst.subject if v.inst is not None else v.item.subject


def _location(v: View) -> str | None:
    return v.inst.location if v.inst is not None else v.item.location


def _entry_id(v: View) -> bytes:
    return ids.entry_id(ids.item_object(v.item.mailbox.idx, v.item.iid))


def _state_flags(v: View) -> int:
    it = v.item
    return (1 if it.is_meeting else 0) | (2 if it.is_meeting and it.my_response != "Organizer" else 0) | \
        (4 if it.is_cancelled else 0)


ITEM_PROPERTIES: dict[ExtKey, Callable[[View], Any]] = {
    _tag(0x0037, "String"): _subject,  # PR_SUBJECT
    _tag(0x0E1D, "String"): _subject,  # PR_NORMALIZED_SUBJECT
    _tag(0x001A, "String"): lambda v: v.item.item_class,  # PR_MESSAGE_CLASS
    _tag(0x0036, "Integer"): lambda v: SENSITIVITY.get(v.item.sensitivity, 0),  # PR_SENSITIVITY
    _tag(0x0E08, "Integer"): lambda v: 900 + len(v.item.subject or "") + len(v.item.body or ""),  # PR_MESSAGE_SIZE
    _tag(0x0E06, "SystemTime"): lambda v: v.item.created,  # PR_MESSAGE_DELIVERY_TIME
    _tag(0x0E23, "Integer"): lambda v: v.item.created_seq,  # PR_INTERNET_ARTICLE_NUMBER: new on arrival
    _tag(0x0FFF, "Binary"): _entry_id,  # PR_ENTRYID
    _tag(0x3007, "SystemTime"): lambda v: v.item.created,  # PR_CREATION_TIME
    _tag(0x3008, "SystemTime"): lambda v: v.item.modified,  # PR_LAST_MODIFICATION_TIME
    _lid("Appointment", 0x8205, "Integer"): lambda v: BUSY_STATUS.get(  # PidLidBusyStatus
        v.inst.free_busy if v.inst is not None else v.item.free_busy, 2),
    _lid("Appointment", 0x8208, "String"): _location,  # PidLidLocation
    _lid("Appointment", 0x820D, "SystemTime"): lambda v: v.start,  # PidLidAppointmentStartWhole
    _lid("Appointment", 0x820E, "SystemTime"): lambda v: v.end,  # PidLidAppointmentEndWhole
    _lid("Appointment", 0x8215, "Boolean"): lambda v: v.item.all_day,  # PidLidAppointmentSubType
    _lid("Appointment", 0x8217, "Integer"): _state_flags,  # PidLidAppointmentStateFlags
    _lid("Appointment", 0x8223, "Boolean"): lambda v: v.item.recurrence is not None,  # PidLidRecurring
}
# The computed properties a client may write, and the item field each one is.
WRITABLE = {
    _tag(0x0037, "String"): "subject",
    _tag(0x0E1D, "String"): "subject",
    _lid("Appointment", 0x8208, "String"): "location",
}


def _folder_entry_id(f: Folder) -> bytes:
    return ids.entry_id(ids.folder_object(f.mailbox.idx, f.no))


FOLDER_PROPERTIES: dict[ExtKey, Callable[[Folder], Any]] = {
    _tag(0x3613, "String"): lambda f: f.folder_class or None,  # PR_CONTAINER_CLASS
    _tag(0x3001, "String"): lambda f: f.name,  # PR_DISPLAY_NAME
    _tag(0x3008, "SystemTime"): lambda f: f.changed,  # PR_LAST_MODIFICATION_TIME
    _tag(0x670A, "SystemTime"): lambda f: f.changed,  # PR_LOCAL_COMMIT_TIME_MAX (a client's "ctag")
    _tag(0x3602, "Integer"): lambda f: len(f.items),  # PR_CONTENT_COUNT
    _tag(0x3603, "Integer"): lambda f: 0,  # PR_CONTENT_UNREAD
    _tag(0x360A, "Boolean"): lambda f: bool(f.mailbox.children(f)),  # PR_SUBFOLDERS
    _tag(0x0FFF, "Binary"): _folder_entry_id,  # PR_ENTRYID
}


def folder_value(folder: Folder, key: ExtKey) -> Any:
    getter = FOLDER_PROPERTIES.get(key)
    if getter is not None:
        return getter(folder)
    return (folder.ext or {}).get(key)


def split_writes(ext: dict[ExtKey, Any], *, strict: bool) -> tuple[dict[str, Any], dict[ExtKey, Any]]:
    """Separate the extended properties a client sent into item fields (PR_SUBJECT is the subject) and the ones
    to store. A computed property that cannot be written is refused when ``strict`` (UpdateItem) and dropped
    otherwise (CreateItem: Exchange computes it anew)."""
    from gateway.simulator.soap import EwsError

    values: dict[str, Any] = {}
    stored: dict[ExtKey, Any] = {}
    for key, value in ext.items():
        attr = WRITABLE.get(key)
        if attr is not None:
            values[attr] = "" if value is None and attr == "subject" else value
        elif key in ITEM_PROPERTIES:
            if strict:
                raise EwsError("ErrorInvalidPropertySet",
                               f"The property {key[0]}:{key[1]} is computed by the server and cannot be set.")
        else:
            stored[key] = value
    return values, stored
