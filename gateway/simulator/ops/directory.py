"""GetRoomLists, GetRooms and ResolveNames: the directory (Active Directory) side of the simulated organisation.

ResolveNames follows Exchange's ambiguous name resolution (ANR) closely enough for a gateway: an exact SMTP
address (optionally ``smtp:``-prefixed) resolves uniquely; anything else is a case-insensitive prefix match against
the display name, each of its words (given name, surname), "surname givenname", the alias and the address.
Room lists are distribution groups, so they resolve too (MailboxType PublicDL).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from gateway.simulator.mailboxes import Mailbox
from gateway.simulator.ops import Context, operation
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import EwsError, Responses, parse_bool, sub

MAX_CANDIDATES = 100  # ResolutionSet maxOccurs


@dataclass(frozen=True)
class Entry:
    """A directory object ResolveNames can return."""

    smtp: str
    name: str
    mailbox_type: str  # Mailbox or PublicDL
    mailbox: Mailbox | None = None

    @property
    def alias(self) -> str:
        return self.smtp.split("@", 1)[0]


def _directory_entries(ctx: Context) -> list[Entry]:
    entries = [Entry(mb.smtp, mb.name, "Mailbox", mb) for mb in ctx.directory.by_idx]
    entries += [Entry(smtp, name, "PublicDL") for smtp, (name, _) in ctx.directory.room_lists.items()]
    return entries


def _address(parent: etree._Element, tag: str, smtp: str, name: str, mailbox_type: str) -> etree._Element:
    el = sub(parent, tag)
    sub(el, "t:Name", name)
    sub(el, "t:EmailAddress", smtp)
    sub(el, "t:RoutingType", "SMTP")
    sub(el, "t:MailboxType", mailbox_type)
    return el


def _single(operation_name: str) -> etree._Element:
    return etree.Element(f"{{{MNS}}}{operation_name}Response", nsmap={"m": MNS, "t": TNS})


# -- GetRoomLists / GetRooms -------------------------------------------------------------------------------------
@operation("GetRoomLists")
async def get_room_lists(ctx: Context, body: etree._Element) -> etree._Element:
    root = _single("GetRoomLists")
    root.set("ResponseClass", "Success")
    sub(root, "m:ResponseCode", "NoError")
    lists = sub(root, "m:RoomLists")
    for smtp, (name, _) in sorted(ctx.directory.room_lists.items(), key=lambda kv: kv[1][0].lower()):
        _address(lists, "t:Address", smtp, name, "PublicDL")
    return root


@operation("GetRooms")
async def get_rooms(ctx: Context, body: etree._Element) -> etree._Element:
    room_list = body.find(f"{{{MNS}}}RoomList")
    address = ((room_list.findtext(f"{{{TNS}}}EmailAddress") if room_list is not None else None) or "").strip()
    root = _single("GetRooms")
    found = ctx.directory.room_lists.get(address.lower())
    if found is None:
        # What Exchange answers for an address that is not a room list (unknown, or a mailbox).
        root.set("ResponseClass", "Error")
        sub(root, "m:MessageText", "No results were found.")
        sub(root, "m:ResponseCode", "ErrorNameResolutionNoResults")
        sub(root, "m:DescriptiveLinkKey", 0)
        return root
    root.set("ResponseClass", "Success")
    sub(root, "m:ResponseCode", "NoError")
    rooms = sub(root, "m:Rooms")
    for smtp in found[1]:
        mb = ctx.directory.find(smtp)
        if mb is None:
            continue
        room = sub(rooms, "t:Room")
        _address(room, "t:Id", mb.smtp, mb.name, "Mailbox")
    return root


# -- ResolveNames --------------------------------------------------------------------------------------------------
def resolve(entries: list[Entry], text: str) -> list[Entry]:
    """The directory objects an UnresolvedEntry names, best first."""
    query = text.strip().lower()
    if query.startswith("smtp:"):
        query = query[5:]
    if not query:
        return []
    exact = [e for e in entries if e.smtp.lower() == query]
    if exact:
        return exact
    found = []
    for e in entries:
        words = e.name.lower().split()
        keys = [e.name.lower(), e.alias.lower(), e.smtp.lower(), *words]
        if len(words) >= 2:
            keys.append(" ".join([words[-1], *words[:-1]]))
            keys.append(f"{words[-1]}, {' '.join(words[:-1])}")
        if any(k.startswith(query) for k in keys):
            found.append(e)
    found.sort(key=lambda e: (e.name.lower(), e.smtp))
    return found


def _contact(parent: etree._Element, e: Entry) -> None:
    c = sub(parent, "t:Contact")
    sub(c, "t:DisplayName", e.name)
    words = e.name.split()
    person = e.mailbox is not None and e.mailbox.kind == "user" and len(words) >= 2
    if person:
        sub(c, "t:GivenName", " ".join(words[:-1]))
    addresses = sub(c, "t:EmailAddresses")
    sub(addresses, "t:Entry", f"SMTP:{e.smtp}", Key="EmailAddress1")
    sub(c, "t:ContactSource", "ActiveDirectory")
    if person:
        sub(c, "t:Surname", words[-1])


@operation("ResolveNames")
async def resolve_names(ctx: Context, body: etree._Element) -> etree._Element:
    text = body.findtext(f"{{{MNS}}}UnresolvedEntry") or ""
    full = parse_bool(body.get("ReturnFullContactData"), False)
    scope = body.get("SearchScope", "ActiveDirectoryContacts")
    # The simulated mailboxes keep no personal contacts: only the directory can answer.
    candidates = resolve(_directory_entries(ctx), text) if scope != "Contacts" else []
    out = Responses("ResolveNames")
    if not candidates:
        out.error(EwsError("ErrorNameResolutionNoResults", "No results were found."))
        return out.root
    if len(candidates) == 1:
        msg = out.success()
    else:
        msg = out.error(EwsError("ErrorNameResolutionMultipleResults", "Multiple results were found."))
        msg.set("ResponseClass", "Warning")
    shown = candidates[:MAX_CANDIDATES]
    rset = sub(msg, "m:ResolutionSet", TotalItemsInView=len(candidates),
               IncludesLastItemInRange=len(candidates) <= MAX_CANDIDATES)
    for e in shown:
        res = sub(rset, "t:Resolution")
        _address(res, "t:Mailbox", e.smtp, e.name, e.mailbox_type)
        if full:
            _contact(res, e)
    return out.root
