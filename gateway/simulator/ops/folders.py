"""Folder operations: GetFolder, FindFolder (restriction, paging), CreateFolder, DeleteFolder and ConvertId."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lxml import etree

from gateway.simulator import ids
from gateway.simulator.itemxml import ext_from_xml, ext_text
from gateway.simulator.mailboxes import FOLDER_CLASS_OF, Folder, Mailbox
from gateway.simulator.mapi import ExtKey, ext_key, folder_value
from gateway.simulator.ops import Context, operation
from gateway.simulator.restrictions import predicate
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import EwsError, Responses, sub

FIND_COUNT_LIMIT = 1000  # EWSFindCountLimit
_NOT_FOUND = "The specified folder could not be found in the store."


def _t(name: str) -> str:
    return f"{{{TNS}}}{name}"


def _m(name: str) -> str:
    return f"{{{MNS}}}{name}"


def target_mailbox(ctx: Context, el: etree._Element) -> Mailbox:
    """The mailbox a DistinguishedFolderId names (its <Mailbox> child), checked against the caller's rights."""
    mb_el = el.find(_t("Mailbox"))
    if mb_el is None:
        return ctx.mailbox
    address = (mb_el.findtext(_t("EmailAddress")) or "").strip()
    mailbox = ctx.directory.get(address)
    if not ctx.may_open(mailbox):
        raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    return mailbox


def resolve_folder(ctx: Context, el: etree._Element) -> Folder:
    """A t:DistinguishedFolderId or t:FolderId -> Folder."""
    name = etree.QName(el).localname
    if name == "DistinguishedFolderId":
        mailbox = target_mailbox(ctx, el)
        return mailbox.folder(el.get("Id", ""))
    if name == "FolderId":
        mb_idx, no = ids.parse_folder_id(el.get("Id", ""))
        if mb_idx >= len(ctx.directory.by_idx):
            raise EwsError("ErrorFolderNotFound", _NOT_FOUND)
        mailbox = ctx.directory.by_idx[mb_idx]
        if not ctx.may_open(mailbox):
            raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        folder = mailbox.folder_at(no)
        if folder is None:
            raise EwsError("ErrorFolderNotFound", _NOT_FOUND)
        return folder
    raise EwsError("ErrorInvalidRequest", f"Unsupported folder id element {name}.")


# -- rendering --------------------------------------------------------------------------------------------------
class FolderShape:
    """What a FolderShape asked for: the base shape and the extended properties to add."""

    __slots__ = ("base", "ext")

    def __init__(self, el: etree._Element | None) -> None:
        base = el.find(_t("BaseShape")) if el is not None else None
        self.base = (base.text or "Default").strip() if base is not None else "Default"
        extra = el.find(_t("AdditionalProperties")) if el is not None else None
        self.ext: list[tuple[etree._Element, ExtKey]] = []
        if extra is not None:
            if extra.find(_t("FieldURI")) is not None and self.base == "IdOnly":
                self.base = "Default"  # the folder properties a client lists are the ones rendered by default
            self.ext = [(uri, ext_key(uri)) for uri in extra.iterfind(_t("ExtendedFieldURI"))]


def render_folder(parent: etree._Element, folder: Folder, shape: FolderShape) -> None:
    el = sub(parent, f"t:{folder.element}")
    sub(el, "t:FolderId", Id=folder.id, ChangeKey=folder.change_key)
    if shape.base != "IdOnly":
        if folder.parent is not None:
            sub(el, "t:ParentFolderId", Id=folder.parent.id, ChangeKey=folder.parent.change_key)
        if folder.folder_class:
            sub(el, "t:FolderClass", folder.folder_class)
        sub(el, "t:DisplayName", folder.name)
        sub(el, "t:TotalCount", len(folder.items))
        sub(el, "t:ChildFolderCount", len(folder.mailbox.children(folder)))
    for uri, key in shape.ext:
        value = folder_value(folder, key)
        if value is None:
            continue
        prop = sub(el, "t:ExtendedProperty")
        etree.SubElement(prop, _t("ExtendedFieldURI"), dict(uri.attrib))
        if isinstance(value, list):
            values = sub(prop, "t:Values")
            for v in value:
                sub(values, "t:Value", ext_text(v))
        else:
            sub(prop, "t:Value", ext_text(value))
    if shape.base != "IdOnly" and folder.element in ("Folder", "TasksFolder", "SearchFolder"):
        sub(el, "t:UnreadCount", 0)


@operation("GetFolder")
async def get_folder(ctx: Context, body: etree._Element) -> etree._Element:
    shape = FolderShape(body.find(_m("FolderShape")))
    out = Responses("GetFolder")
    folder_ids = body.find(_m("FolderIds"))
    assert folder_ids is not None
    for fid in folder_ids:
        try:
            folder = resolve_folder(ctx, fid)
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        render_folder(sub(msg, "m:Folders"), folder, shape)
    return out.root


# -- FindFolder -------------------------------------------------------------------------------------------------
_FOLDER_FIELDS: dict[str, Callable[[Folder], Any]] = {
    "folder:DisplayName": lambda f: f.name,
    "folder:FolderClass": lambda f: f.folder_class or None,
    "folder:TotalCount": lambda f: len(f.items),
    "folder:ChildFolderCount": lambda f: len(f.mailbox.children(f)),
    "folder:UnreadCount": lambda f: 0,
}


def _folder_operand(el: etree._Element) -> Callable[[Folder], Any]:
    uri = el.find(_t("FieldURI"))
    if uri is not None:
        getter = _FOLDER_FIELDS.get(uri.get("FieldURI", ""))
        if getter is None:
            raise EwsError("ErrorUnsupportedPathForQuery",
                           f"The property {uri.get('FieldURI')} is not supported in folder restrictions.")
        return getter
    ext = el.find(_t("ExtendedFieldURI"))
    if ext is not None:
        key = ext_key(ext)
        return lambda f: folder_value(f, key)
    raise EwsError("ErrorUnsupportedPathForQuery", "Unsupported property in restriction.")


def _page(found: list[Folder], body: etree._Element) -> tuple[list[Folder], dict[str, Any]]:
    """The page of ``found`` the request's view asks for, and the RootFolder attributes describing it."""
    total = len(found)
    indexed = body.find(_m("IndexedPageFolderView"))
    fractional = body.find(_m("FractionalPageFolderView"))
    view = indexed if indexed is not None else fractional
    limit = FIND_COUNT_LIMIT
    if view is not None and view.get("MaxEntriesReturned"):
        limit = min(int(view.get("MaxEntriesReturned", "0")), FIND_COUNT_LIMIT)
    if fractional is not None:
        numerator, denominator = int(fractional.get("Numerator", "0")), int(fractional.get("Denominator", "1"))
        start = total * numerator // max(denominator, 1)
        if fractional.get("BasePoint") == "End":
            start = max(0, total - start - limit)
        shown = found[start:start + limit]
        return shown, {"NumeratorOffset": start + len(shown), "AbsoluteDenominator": total,
                       "TotalItemsInView": total, "IncludesLastItemInRange": start + len(shown) >= total}
    offset = int(indexed.get("Offset", "0")) if indexed is not None else 0
    if indexed is not None and indexed.get("BasePoint") == "End":
        stop = max(0, total - offset)
        shown = found[max(0, stop - limit):stop]
        last = stop - len(shown) <= 0
    else:
        shown = found[offset:offset + limit]
        last = offset + len(shown) >= total
    return shown, {"IndexedPagingOffset": offset + len(shown), "TotalItemsInView": total,
                   "IncludesLastItemInRange": last}


@operation("FindFolder")
async def find_folder(ctx: Context, body: etree._Element) -> etree._Element:
    shape = FolderShape(body.find(_m("FolderShape")))
    deep = body.get("Traversal", "Shallow") == "Deep"
    restriction = body.find(_m("Restriction"))
    pred = predicate(restriction[0], _folder_operand) if restriction is not None and len(restriction) else None
    out = Responses("FindFolder")
    parents = body.find(_m("ParentFolderIds"))
    assert parents is not None
    for fid in parents:
        try:
            if body.get("Traversal") == "SoftDeleted":
                raise EwsError("ErrorInvalidRequest", "SoftDeleted traversal is not supported for folders.")
            parent = resolve_folder(ctx, fid)
        except EwsError as e:
            out.error(e)
            continue
        found: list[Folder] = []
        frontier = [parent]
        while frontier:
            kids = parent.mailbox.children(frontier.pop(0))
            found.extend(kids)
            if deep:
                frontier.extend(kids)
        if pred is not None:
            found = [f for f in found if pred(f)]
        shown, attrs = _page(found, body)
        msg = out.success()
        root = sub(msg, "m:RootFolder", **attrs)
        folders = sub(root, "t:Folders")
        for f in shown:
            render_folder(folders, f, shape)
    return out.root


# -- CreateFolder / DeleteFolder -------------------------------------------------------------------------------
_CREATABLE = ("Folder", "CalendarFolder", "ContactsFolder", "TasksFolder")


@operation("CreateFolder")
async def create_folder(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("CreateFolder")
    parent_el = body.find(_m("ParentFolderId"))
    folders = body.find(_m("Folders"))
    assert parent_el is not None and folders is not None
    try:
        parent: Folder | None = resolve_folder(ctx, parent_el[0])
        error: EwsError | None = None
    except EwsError as e:
        parent, error = None, e
    for el in folders:
        try:
            if parent is None:
                assert error is not None
                raise error
            created = _create_one(parent, el)
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        done = sub(sub(msg, "m:Folders"), f"t:{created.element}")
        sub(done, "t:FolderId", Id=created.id, ChangeKey=created.change_key)
    return out.root


def _create_one(parent: Folder, el: etree._Element) -> Folder:
    element = etree.QName(el).localname
    if element not in _CREATABLE:
        raise EwsError("ErrorInvalidRequest", f"The simulator cannot create a {element}; use one of {_CREATABLE}.")
    name = (el.findtext(_t("DisplayName")) or "").strip()
    if not name:
        raise EwsError("ErrorInvalidRequest", "A new folder needs a DisplayName.")
    folder_class = (el.findtext(_t("FolderClass")) or "").strip() or FOLDER_CLASS_OF[element]
    folder = parent.mailbox.add_folder(parent, name, folder_class, element)
    for prop in el.iterfind(_t("ExtendedProperty")):
        key, value = ext_from_xml(prop)
        folder.ext = {**(folder.ext or {}), key: value}
    return folder


@operation("DeleteFolder")
async def delete_folder(ctx: Context, body: etree._Element) -> etree._Element:
    out = Responses("DeleteFolder")
    delete_type = body.get("DeleteType", "HardDelete")
    folder_ids = body.find(_m("FolderIds"))
    assert folder_ids is not None
    for fid in folder_ids:
        try:
            folder = resolve_folder(ctx, fid)
            if folder.distinguished is not None:
                raise EwsError("ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted.")
            ctx.directory.delete_folder(folder, delete_type)
        except EwsError as e:
            out.error(e)
            continue
        out.success()
    return out.root


# -- ConvertId --------------------------------------------------------------------------------------------------
@operation("ConvertId")
async def convert_id(ctx: Context, body: etree._Element) -> etree._Element:
    """Ids between the forms Exchange knows (EwsId, EwsLegacyId, EntryId, HexEntryId, StoreId, OwaId).

    As on Exchange the conversion is a pure function of the id: the mailbox address is only checked for its form
    and answered back, and neither the mailbox nor the item is looked up. (exchangelib probes the server version
    with a ConvertId of a dummy id: that stays ErrorInvalidIdMalformed.)
    """
    out = Responses("ConvertId")
    destination = body.get("DestinationFormat", "EwsId")
    source = body.find(_m("SourceIds"))
    for el in source if source is not None else []:
        try:
            if etree.QName(el).localname != "AlternateId":
                raise EwsError("ErrorInvalidIdMalformed", "Id is malformed: this server has no public folders.")
            obj = ids.parse_any_id(el.get("Id", ""), el.get("Format", ""))
            mailbox = el.get("Mailbox", "").strip()
            if mailbox.count("@") != 1 or mailbox.startswith("@") or mailbox.endswith("@"):
                raise EwsError("ErrorInvalidSmtpAddress", f"The SMTP address {mailbox!r} has an invalid format.")
        except EwsError as e:
            out.error(e)
            continue
        msg = out.success()
        alt = sub(msg, "m:AlternateId", Format=destination, Id=ids.format_id(obj, destination), Mailbox=mailbox)
        alt.set("{http://www.w3.org/2001/XMLSchema-instance}type", "t:AlternateIdType")
    return out.root
