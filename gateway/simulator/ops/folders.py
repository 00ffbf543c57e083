"""GetFolder, FindFolder and ConvertId (the minimal calls clients make before anything else)."""

from __future__ import annotations

from lxml import etree

from gateway.simulator import ids
from gateway.simulator.mailboxes import Folder, Mailbox
from gateway.simulator.ops import Context, operation
from gateway.simulator.schema import TNS
from gateway.simulator.soap import EwsError, Responses, sub


def target_mailbox(ctx: Context, el: etree._Element) -> Mailbox:
    """The mailbox a DistinguishedFolderId names (its <Mailbox> child), checked against the caller's rights."""
    mb_el = el.find(f"{{{TNS}}}Mailbox")
    if mb_el is None:
        return ctx.mailbox
    address = (mb_el.findtext(f"{{{TNS}}}EmailAddress") or "").strip()
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
            raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        mailbox = ctx.directory.by_idx[mb_idx]
        if not ctx.may_open(mailbox):
            raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        if no >= len(mailbox.folder_list):
            raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        return mailbox.folder_list[no]
    raise EwsError("ErrorInvalidRequest", f"Unsupported folder id element {name}.")


def render_folder(parent: etree._Element, folder: Folder, shape: str) -> None:
    el = sub(parent, f"t:{folder.element}")
    sub(el, "t:FolderId", Id=folder.id, ChangeKey=folder.change_key)
    if shape == "IdOnly":
        return
    if folder.parent is not None:
        sub(el, "t:ParentFolderId", Id=folder.parent.id, ChangeKey=folder.parent.change_key)
    if folder.folder_class:
        sub(el, "t:FolderClass", folder.folder_class)
    sub(el, "t:DisplayName", folder.name)
    sub(el, "t:TotalCount", len(folder.items))
    children = [f for f in folder.mailbox.folder_list if f.parent is folder]
    sub(el, "t:ChildFolderCount", len(children))
    if folder.element == "Folder":
        sub(el, "t:UnreadCount", 0)


def _shape(body: etree._Element) -> str:
    base = body.find(f".//{{{TNS}}}BaseShape")
    shape = (base.text or "Default").strip() if base is not None else "Default"
    if shape == "IdOnly" and body.find(f".//{{{TNS}}}AdditionalProperties") is not None:
        return "Default"  # the folder properties a client lists are the ones rendered by default
    return shape


@operation("GetFolder")
async def get_folder(ctx: Context, body: etree._Element) -> etree._Element:
    shape = _shape(body)
    out = Responses("GetFolder")
    folder_ids = body.find("{http://schemas.microsoft.com/exchange/services/2006/messages}FolderIds")
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


@operation("FindFolder")
async def find_folder(ctx: Context, body: etree._Element) -> etree._Element:
    shape = _shape(body)
    deep = body.get("Traversal", "Shallow") == "Deep"
    out = Responses("FindFolder")
    parents = body.find("{http://schemas.microsoft.com/exchange/services/2006/messages}ParentFolderIds")
    assert parents is not None
    for fid in parents:
        try:
            parent = resolve_folder(ctx, fid)
        except EwsError as e:
            out.error(e)
            continue
        found: list[Folder] = []
        frontier = [parent]
        while frontier:
            current = frontier.pop(0)
            kids = [f for f in current.mailbox.folder_list if f.parent is current]
            found.extend(kids)
            if deep:
                frontier.extend(kids)
        msg = out.success()
        root = sub(msg, "m:RootFolder", TotalItemsInView=len(found), IncludesLastItemInRange=True)
        folders = sub(root, "t:Folders")
        for f in found:
            render_folder(folders, f, shape)
    return out.root


@operation("ConvertId")
async def convert_id(ctx: Context, body: etree._Element) -> etree._Element:
    # exchangelib probes the server version with a dummy ConvertId; ids here are not convertible.
    out = Responses("ConvertId")
    source = body.find("{http://schemas.microsoft.com/exchange/services/2006/messages}SourceIds")
    for _ in source if source is not None else []:
        out.error(EwsError("ErrorInvalidIdMalformed", "Id is malformed."))
    return out.root
