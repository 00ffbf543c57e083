"""EwsDirectory: the Directory port over EWS, as the service account sees the organisation (no impersonation).

Room lists come from GetRoomLists and GetRooms; a room's details and people from ResolveNames, which answers for one
name at a time (exchangelib packs several into one request, which Exchange refuses) and tells distribution groups
apart from mailboxes but not a room's mailbox from a person's. EWS keeps no room capacity: that lives in Active
Directory (the LDAP directory, later).
"""

from __future__ import annotations

from typing import Any

from exchangelib import errors as xerr
from exchangelib.properties import Mailbox
from exchangelib.protocol import Protocol

from gateway.errors import MailboxNotFound, NotFound
from gateway.model import Person
from gateway.ports import RoomInfo, RoomList
from gateway.sources.ews.source import EwsSource


class EwsDirectory:
    """Implements ports.Directory with the calls of an EwsSource (its pool, its error mapping, its call counter)."""

    def __init__(self, source: EwsSource) -> None:
        self.source = source

    def _protocol(self) -> Protocol:
        return Protocol(config=self.source.config)

    async def room_lists(self) -> list[RoomList]:
        def read() -> list[RoomList]:
            return [RoomList(r.email_address.lower(), r.name) for r in self._protocol().get_roomlists()]
        return await self.source.run(None, read)

    async def rooms(self, room_list: str) -> list[RoomInfo]:
        def read() -> list[RoomInfo]:
            try:
                return [RoomInfo(r.email_address.lower(), r.name) for r in self._protocol().get_rooms(room_list)]
            except (xerr.ErrorNameResolutionNoResults, xerr.ErrorNameResolutionNoMailbox) as e:
                # what Exchange answers for anything but a room list
                raise NotFound(f"Exchange has no room list {room_list}", key="room_list_not_found",
                               remedy="check the room list's address in the configuration (room_lists): "
                                      "`Get-DistributionGroup -RecipientTypeDetails RoomList` shows the room lists' "
                                      "addresses") from e
        return await self.source.run(room_list, read)

    async def room(self, email: str) -> RoomInfo:
        def read() -> RoomInfo:
            for mb in self._resolve(email):
                if (mb.email_address or "").lower() == email.lower() and mb.mailbox_type == "Mailbox":
                    return RoomInfo(email.lower(), mb.name)
            raise MailboxNotFound(f"Exchange's directory has no mailbox {email}")
        return await self.source.run(email, read)

    async def people(self, query: str) -> list[Person]:
        def read() -> list[Person]:
            return [Person(mb.email_address.lower(), mb.name) for mb in self._resolve(query)
                    if mb.email_address and mb.mailbox_type == "Mailbox"]
        return await self.source.run(None, read)

    async def mailbox_kind(self, address: str) -> tuple[str, str | None]:
        """What the directory says an address is (ResolveNames; for `gateway doctor`, not part of the port):
        ("person", name) for a mailbox with a given name and a surname, ("group", name) for a distribution group (a
        room list too), ("mailbox", name) otherwise, ("unknown", None) when nothing resolves. EWS has no room flag
        before FindPeople, so this is evidence, not proof: room mailboxes normally carry neither a given name nor a
        surname."""
        def resolve() -> tuple[str, str | None]:
            try:
                found = self._protocol().resolve_names([address], return_full_contact_data=True)
            except xerr.ErrorNameResolutionNoResults:
                return "unknown", None
            for entry in found:
                if isinstance(entry, Exception) or not isinstance(entry, tuple):
                    continue
                mailbox, contact = entry
                if (mailbox.email_address or "").lower() != address.lower():
                    continue
                name = mailbox.name or (contact.display_name if contact else None)
                if mailbox.mailbox_type in ("PublicDL", "PrivateDL", "GroupMailbox"):
                    return "group", name
                if contact is not None and contact.given_name and contact.surname:
                    return "person", name
                return "mailbox", name
            return "unknown", None
        return await self.source.run(address, resolve)

    def _resolve(self, name: str) -> list[Any]:
        """ResolveNames for one name: the mailboxes and groups it names (none: an empty list)."""
        found = self._protocol().resolve_names([name])
        return [m for m in found if isinstance(m, Mailbox)]
