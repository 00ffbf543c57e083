"""The simulated organisation: users, rooms, room lists, service accounts, folders and every item change.

All mutations happen on the simulator's event loop; every change bumps the item's version (its ChangeKey) and
the mailbox's change sequence (which SyncFolderItems and notifications read), and is announced to listeners.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from gateway.simulator import ids
from gateway.simulator.calendar import CalendarItem, Person
from gateway.simulator.soap import EwsError

# The distinguished folders every Exchange 2016 mailbox has: name -> (display name, folder class, element, parent).
# The position is the folder's number in its FolderId, so entries are only ever appended. The first CORE_FOLDERS
# exist from the start; the rest appear the first time a request reaches past them (a benchmark's ten thousand
# rooms never need their Journal).
STANDARD_FOLDERS: dict[str, tuple[str, str, str, str | None]] = {
    "root": ("", "", "Folder", None),
    "msgfolderroot": ("Top of Information Store", "IPF.Note", "Folder", "root"),
    "calendar": ("Calendar", "IPF.Appointment", "CalendarFolder", "msgfolderroot"),
    "inbox": ("Inbox", "IPF.Note", "Folder", "msgfolderroot"),
    "sentitems": ("Sent Items", "IPF.Note", "Folder", "msgfolderroot"),
    "deleteditems": ("Deleted Items", "IPF.Note", "Folder", "msgfolderroot"),
    "drafts": ("Drafts", "IPF.Note", "Folder", "msgfolderroot"),
    "outbox": ("Outbox", "IPF.Note", "Folder", "msgfolderroot"),
    "contacts": ("Contacts", "IPF.Contact", "ContactsFolder", "msgfolderroot"),
    "tasks": ("Tasks", "IPF.Task", "TasksFolder", "msgfolderroot"),
    "notes": ("Notes", "IPF.StickyNote", "Folder", "msgfolderroot"),
    "journal": ("Journal", "IPF.Journal", "Folder", "msgfolderroot"),
    "junkemail": ("Junk Email", "IPF.Note", "Folder", "msgfolderroot"),
    "conversationhistory": ("Conversation History", "IPF.Note", "Folder", "msgfolderroot"),
    "syncissues": ("Sync Issues", "IPF.Note", "Folder", "msgfolderroot"),
    "conflicts": ("Conflicts", "IPF.Note", "Folder", "syncissues"),
    "localfailures": ("Local Failures", "IPF.Note", "Folder", "syncissues"),
    "serverfailures": ("Server Failures", "IPF.Note", "Folder", "syncissues"),
    "recipientcache": ("Recipient Cache", "IPF.Contact.RecipientCache", "ContactsFolder", "contacts"),
    "quickcontacts": ("{06967759-274D-40B2-A3EB-D7F9E73727D7}", "IPF.Contact.MOC.QuickContacts", "ContactsFolder",
                      "contacts"),
    "searchfolders": ("Finder", "", "Folder", "root"),
    "recoverableitemsroot": ("Recoverable Items", "", "Folder", "root"),
    "recoverableitemsdeletions": ("Deletions", "", "Folder", "recoverableitemsroot"),
    "recoverableitemsversions": ("Versions", "", "Folder", "recoverableitemsroot"),
    "recoverableitemspurges": ("Purges", "", "Folder", "recoverableitemsroot"),
}
CORE_FOLDERS = 8  # root .. outbox
_LAZY_PARENTS = frozenset(parent for _, _, _, parent in list(STANDARD_FOLDERS.values())[CORE_FOLDERS:])
# What a created folder's element makes its class when the request names none.
FOLDER_CLASS_OF = {"Folder": "IPF.Note", "CalendarFolder": "IPF.Appointment", "ContactsFolder": "IPF.Contact",
                   "TasksFolder": "IPF.Task", "SearchFolder": "IPF.Note"}


@dataclass
class CalendarProcessing:
    """Set-CalendarProcessing for a room, with Exchange's defaults."""

    automate_processing: str = "AutoAccept"  # None, AutoUpdate, AutoAccept
    allow_conflicts: bool = False
    booking_window_in_days: int = 180
    enforce_scheduling_horizon: bool = True
    maximum_duration_in_minutes: int = 1440
    allow_recurring_meetings: bool = True
    conflict_percentage_allowed: int = 0
    maximum_conflict_instances: int = 0
    add_organizer_to_subject: bool = True
    delete_subject: bool = True
    delete_comments: bool = True
    remove_private_property: bool = True
    process_external_meeting_messages: bool = False
    all_book_in_policy: bool = True
    book_in_policy: tuple[str, ...] = ()  # addresses whose in-policy requests are booked (AllBookInPolicy $false)
    all_request_in_policy: bool = False
    request_in_policy: tuple[str, ...] = ()  # addresses whose in-policy requests wait for a delegate
    enable_response_details: bool = True  # a decline says why

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown calendar-processing setting {key!r}; known: {sorted(known)}")
            if key in ("book_in_policy", "request_in_policy"):
                value = tuple(str(v).lower() for v in ((value,) if isinstance(value, str) else value))
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def permission(self, smtp: str) -> str:
        """What the in-policy rules let ``smtp`` do: "book", "request" (a delegate decides) or "" (nothing)."""
        if self.all_book_in_policy or smtp.lower() in self.book_in_policy:
            return "book"
        if self.all_request_in_policy or smtp.lower() in self.request_in_policy:
            return "request"
        return ""


class Folder:
    __slots__ = (
        "by_goid",
        "changed",
        "distinguished",
        "element",
        "ext",
        "folder_class",
        "items",
        "mailbox",
        "name",
        "no",
        "parent",
        "tombstones",
    )

    def __init__(self, no: int, mailbox: Mailbox, distinguished: str | None, name: str, folder_class: str,
                 element: str, parent: Folder | None) -> None:
        self.no = no
        self.mailbox = mailbox
        self.distinguished = distinguished
        self.name = name
        self.folder_class = folder_class
        self.element = element
        self.items: dict[int, CalendarItem] = {}
        # (seq of deletion, iid, created_seq) for SyncFolderItems
        self.tombstones: list[tuple[int, int, int]] = []
        self.by_goid: dict[bytes, int] = {}
        self.parent = parent
        self.changed = _EPOCH  # last change to the folder or its contents (PR_LOCAL_COMMIT_TIME_MAX)
        self.ext: dict[tuple[str, str, str], Any] | None = None  # extended properties a client set

    @property
    def id(self) -> str:
        return ids.folder_id(self.mailbox.idx, self.no)

    @property
    def change_key(self) -> str:
        return ids.change_key(self.no, 1)

    def within(self, other: Folder) -> bool:
        """Whether this folder is ``other`` or lies below it."""
        f: Folder | None = self
        while f is not None:
            if f is other:
                return True
            f = f.parent
        return False


_EPOCH = datetime(2016, 1, 1, tzinfo=UTC)  # when the simulated mailboxes were "created"


@dataclass(eq=False)
class Mailbox:
    idx: int
    smtp: str
    name: str
    kind: str = "user"  # user, room, service
    username: str = ""
    password: str | None = None
    capacity: int | None = None
    processing: CalendarProcessing | None = None
    impersonation: str | frozenset[str] | None = None  # None, "rooms", "all", or explicit addresses
    full_access: frozenset[str] = frozenset()  # delegates (Add-MailboxPermission -AccessRights FullAccess)
    backend: int = 0
    seq: int = 0
    folders: dict[str, Folder] = field(default_factory=dict)  # the distinguished ones made so far, by name
    folder_list: list[Folder | None] = field(default_factory=list)  # by folder number; None once deleted
    working_tz: str = "W. Europe Standard Time"
    side: str = "ews"  # where the mailbox lives in a hybrid estate: "ews" (on-premise) or "graph" (Exchange Online)
    building: str = ""  # what the Places API shows of a room
    floor: int | None = None

    @property
    def person(self) -> Person:
        return Person(self.smtp, self.name, "SMTP", "Mailbox")

    @property
    def calendar(self) -> Folder:
        return self.folders["calendar"]

    def folder(self, name: str) -> Folder:
        """A distinguished folder by its name (DistinguishedFolderId)."""
        found = self.folders.get(name)
        if found is None and name in STANDARD_FOLDERS:
            self._complete()
            found = self.folders.get(name)
        if found is None:
            raise EwsError("ErrorFolderNotFound", f"The distinguished folder {name!r} does not exist.")
        return found

    def folder_at(self, no: int) -> Folder | None:
        """The folder with number ``no`` (of a FolderId); None if there is none (any more)."""
        if len(self.folder_list) <= no < len(STANDARD_FOLDERS):
            self._complete()
        return self.folder_list[no] if 0 <= no < len(self.folder_list) else None

    def children(self, parent: Folder) -> list[Folder]:
        if parent.distinguished in _LAZY_PARENTS:  # a calendar's ChildFolderCount needs no Journal
            self._complete()
        return [f for f in self.folder_list if f is not None and f.parent is parent]

    def add_standard_folders(self, count: int) -> None:
        """Make the first ``count`` standard folders that do not exist yet."""
        for name in list(STANDARD_FOLDERS)[len(self.folder_list):count]:
            display, cls, element, parent = STANDARD_FOLDERS[name]
            f = Folder(len(self.folder_list), self, name, display, cls, element,
                       self.folders[parent] if parent else None)
            self.folders[name] = f
            self.folder_list.append(f)

    def _complete(self) -> None:
        if len(self.folder_list) < len(STANDARD_FOLDERS):
            self.add_standard_folders(len(STANDARD_FOLDERS))

    def add_folder(self, parent: Folder, name: str, folder_class: str, element: str) -> Folder:
        """CreateFolder: a folder of the user's own below ``parent``."""
        self._complete()  # its number must come after every standard folder's
        if any(f.name.lower() == name.lower() for f in self.children(parent)):
            raise EwsError("ErrorFolderExists", "A folder with the specified name already exists.")
        f = Folder(len(self.folder_list), self, None, name, folder_class, element, parent)
        f.changed = datetime.now(UTC)
        self.folder_list.append(f)
        return f

    def drop_folder(self, folder: Folder) -> list[Folder]:
        """Forget ``folder`` and every folder below it; returns them (their items are the caller's)."""
        gone = [f for f in self.folder_list if f is not None and f.within(folder)]
        for f in gone:
            self.folder_list[f.no] = None
        return gone


Listener = Callable[[str, "Folder", CalendarItem | None, int, "Folder | None", int | None], None]


class Directory:
    """Every mailbox and item of the simulated organisation."""

    def __init__(self, domain: str = "contoso.com", netbios: str = "CONTOSO", backends: int = 2) -> None:
        self.domain = domain
        self.netbios = netbios
        self.backends = max(1, backends)
        self.mailboxes: dict[str, Mailbox] = {}
        self.by_idx: list[Mailbox] = []
        self.by_username: dict[str, Mailbox] = {}
        self.room_lists: dict[str, tuple[str, list[str]]] = {}
        self.items: dict[int, CalendarItem] = {}
        self.next_iid = 1
        self.listeners: list[Listener] = []

    # -- directory ---------------------------------------------------------------------------------
    def add_mailbox(self, smtp: str, name: str, kind: str = "user", *, password: str | None = None,
                    capacity: int | None = None, impersonation: str | frozenset[str] | None = None) -> Mailbox:
        smtp = smtp.lower()
        if smtp in self.mailboxes:
            raise ValueError(f"mailbox {smtp} exists already")
        local = smtp.split("@", 1)[0]
        mb = Mailbox(idx=len(self.by_idx), smtp=smtp, name=name, kind=kind, username=local, password=password,
                     capacity=capacity, impersonation=impersonation,
                     backend=zlib.crc32(smtp.encode()) % self.backends)
        if kind == "room":
            mb.processing = CalendarProcessing()
        mb.add_standard_folders(CORE_FOLDERS)
        self.mailboxes[smtp] = mb
        self.by_idx.append(mb)
        if password is not None:
            for name_form in (local, f"{self.netbios}\\{local}", smtp):
                self.by_username[name_form.lower()] = mb
        return mb

    def add_room_list(self, smtp: str, name: str, rooms: list[str]) -> None:
        self.room_lists[smtp.lower()] = (name, [r.lower() for r in rooms])

    def get(self, smtp: str) -> Mailbox:
        mb = self.mailboxes.get(smtp.lower())
        if mb is None:
            raise EwsError("ErrorNonExistentMailbox", f"The SMTP address has no mailbox associated with it: {smtp}")
        return mb

    def find(self, smtp: str) -> Mailbox | None:
        return self.mailboxes.get(smtp.lower())

    def logon(self, username: str) -> Mailbox | None:
        """The mailbox behind a logon name: DOMAIN\\user, user, or a UPN."""
        return self.by_username.get(username.lower())

    def may_impersonate(self, account: Mailbox, target: Mailbox) -> bool:
        scope = account.impersonation
        if scope is None:
            return False
        if scope == "all":
            return True
        if scope == "rooms":
            return target.kind == "room"
        return isinstance(scope, frozenset) and target.smtp in scope

    def grant_full_access(self, mailbox: str, delegate: str) -> None:
        """Add-MailboxPermission -AccessRights FullAccess: ``delegate`` may open ``mailbox`` without impersonation."""
        target, user = self.get(mailbox), self.get(delegate)
        target.full_access = target.full_access | {user.smtp}

    def person(self, email: str, name: str = "") -> Person:
        mb = self.find(email)
        if mb is not None:
            return mb.person
        return Person(email, name or email, "SMTP", "OneOff")

    def rooms(self) -> Iterator[Mailbox]:
        return (mb for mb in self.by_idx if mb.kind == "room")

    # -- items -------------------------------------------------------------------------------------
    def new_iid(self) -> int:
        iid = self.next_iid
        self.next_iid += 1
        return iid

    def item(self, iid: int) -> CalendarItem | None:
        return self.items.get(iid)

    def add_item(self, item: CalendarItem, *, notify: bool = True) -> CalendarItem:
        folder = item.folder
        mb = folder.mailbox
        mb.seq += 1
        item.seq = item.created_seq = mb.seq
        folder.items[item.iid] = item
        folder.by_goid[item.goid] = item.iid
        folder.changed = item.modified
        self.items[item.iid] = item
        if notify:
            self._emit("CreatedEvent", folder, item, item.iid)
            self._emit("FreeBusyChangedEvent", folder, item, item.iid)
        return item

    def touch(self, item: CalendarItem, *, free_busy: bool = True) -> None:
        """Record a change: new ChangeKey, new sync sequence, Modified (and FreeBusyChanged) events."""
        mb = item.folder.mailbox
        mb.seq += 1
        item.seq = mb.seq
        item.version += 1
        item.modified = item.folder.changed = datetime.now(UTC)
        self._emit("ModifiedEvent", item.folder, item, item.iid)
        if free_busy:
            self._emit("FreeBusyChangedEvent", item.folder, item, item.iid)

    def remove_item(self, item: CalendarItem, delete_type: str = "HardDelete") -> None:
        folder = item.folder
        mb = folder.mailbox
        mb.seq += 1
        folder.items.pop(item.iid, None)
        if folder.by_goid.get(item.goid) == item.iid:
            del folder.by_goid[item.goid]
        self.items.pop(item.iid, None)
        folder.tombstones.append((mb.seq, item.iid, item.created_seq))
        folder.changed = datetime.now(UTC)
        old_iid = item.iid
        if delete_type in ("MoveToDeletedItems", "SoftDelete") and folder.distinguished != "deleteditems":
            target = mb.folders["deleteditems"]
            item.iid = self.new_iid()  # an item that moves gets a new ItemId, as in Exchange
            item.folder = target
            target.changed = folder.changed
            mb.seq += 1
            item.seq = item.created_seq = mb.seq
            target.items[item.iid] = item
            self.items[item.iid] = item
            self._emit("MovedEvent", target, item, item.iid, folder, old_iid)
        else:
            self._emit("DeletedEvent", folder, None, old_iid)
        self._emit("FreeBusyChangedEvent", folder, None, old_iid)

    def delete_folder(self, folder: Folder, delete_type: str = "HardDelete") -> None:
        """DeleteFolder of a folder of the user's own: into Deleted Items, or gone with what it holds."""
        mb = folder.mailbox
        deleted_items = mb.folder("deleteditems")
        if delete_type == "MoveToDeletedItems" and not folder.within(deleted_items):
            folder.parent = deleted_items
            folder.changed = deleted_items.changed = datetime.now(UTC)
            return
        for f in mb.drop_folder(folder):
            for item in f.items.values():
                self.items.pop(item.iid, None)
            f.items.clear()
            f.by_goid.clear()
        if folder.parent is not None:
            folder.parent.changed = datetime.now(UTC)

    def _emit(self, kind: str, folder: Folder, item: CalendarItem | None, iid: int,
              old_folder: Folder | None = None, old_iid: int | None = None) -> None:
        for listener in self.listeners:
            listener(kind, folder, item, iid, old_folder, old_iid)
