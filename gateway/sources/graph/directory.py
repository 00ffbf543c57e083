"""GraphDirectory: rooms and room lists through the Places API, people through /users (a Directory), and the
tenant's people for the people sync through /users/delta (a ChangeReader: gateway/sources/graph/people.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from gateway.errors import MailboxNotFound, NotFound
from gateway.model import Person
from gateway.ports import RoomInfo, RoomList
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.people import GraphPeople
from gateway.sync.people import PeopleRead, Position

DIRECTORY = "directory"  # the mailbox label of directory requests (they address no mailbox)


def _room(p: dict[str, Any]) -> RoomInfo | None:
    email = str(p.get("emailAddress") or "").lower()
    if not email:
        return None
    capacity = p.get("capacity")
    return RoomInfo(email, p.get("displayName"), capacity if isinstance(capacity, int) else None)


class GraphDirectory:
    def __init__(self, client: GraphClient, source: str = "") -> None:
        self.client = client
        self._people = GraphPeople(client, source)

    async def read_changes(self, since: Position | None) -> PeopleRead:
        """The tenant's people, or their changes since ``since`` (the people sync's reader)."""
        return await self._people.read_changes(since)

    async def _all(self, path: str, params: dict[str, str] | None = None, *, item: bool = False,
                   ) -> list[dict[str, Any]]:
        return await self.client.pages(path, mailbox=DIRECTORY, operation="places", params=params, item=item)

    async def room_lists(self) -> list[RoomList]:
        return [RoomList(str(p["emailAddress"]).lower(), p.get("displayName"))
                for p in await self._all("/places/microsoft.graph.roomlist", {"$top": "100"}) if p.get("emailAddress")]

    async def rooms(self, room_list: str) -> list[RoomInfo]:
        try:
            found = await self._all(f"/places/{quote(room_list.lower(), safe='@')}/microsoft.graph.roomlist/rooms",
                                    {"$top": "100"}, item=True)
        except NotFound:
            raise NotFound(f"there is no room list {room_list} in Exchange Online", key="room_list_not_found",
                           remedy="check the room list's address (Get-Place -Type RoomList)") from None
        return [r for r in (_room(p) for p in found) if r is not None]

    async def room(self, email: str) -> RoomInfo:
        try:
            answer = await self.client.call("GET", f"/places/{quote(email.lower(), safe='@')}", mailbox=DIRECTORY,
                                            operation="places", item=True)
        except NotFound:
            raise MailboxNotFound(f"Exchange Online has no room {email}") from None
        found = _room(answer.body)
        if found is None:
            raise MailboxNotFound(f"Exchange Online has no room {email}")
        return found

    async def people(self, query: str) -> list[Person]:
        q = query.replace("'", "''")
        # As Exchange's ambiguous name resolution: the display name, given name, surname or address starts so.
        flt = " or ".join(f"startswith({p},'{q}')" for p in ("displayName", "givenName", "surname", "mail"))
        answer = await self.client.call("GET", "/users", mailbox=DIRECTORY, operation="users",
                                        params={"$filter": flt, "$select": "displayName,mail", "$top": "25"})
        return [Person(str(u["mail"]).lower(), u.get("displayName")) for u in answer.body.get("value") or ()
                if isinstance(u, dict) and u.get("mail")]
