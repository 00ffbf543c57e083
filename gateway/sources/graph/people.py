"""GraphPeople: a tenant's people from Entra ID through ``/users/delta``, for the people sync (a ChangeReader of
gateway/sync/people.py): the same person events as from Active Directory.

- Position: the round's ``@odata.deltaLink`` (kept as the position's text; its number is 0). A full read starts a
  fresh round (``/users/delta?$select=...``), which lists everyone; the next reads follow the deltaLink.
- A later round lists only what changed, and a changed user only by the properties that changed: each one is read
  again whole (``GET /users/{id}``, twenty to a ``$batch``). ``@removed`` (soft-deleted, ``changed``, or for good,
  ``deleted``) is the person removed.
- An expired or rejected delta token (410 ``SyncStateNotFound``, ``resyncRequired``) is a full read: never silence.
- Rooms are users in Entra ID (resource accounts): they are left out by the tenant's Places list of rooms
  (``/places/microsoft.graph.room``, read with every sync: it needs Place.Read.All, as room lists do). Users
  without a mailbox (no ``mail``) are not people either. ``/users/delta`` filters only by id, so neither can be
  left out by ``$filter``.
- The manager: ``manager@delta`` in a round, ``$expand=manager`` in a read; relayed by address when the manager is
  one of the people (the person's dn is their id, so the sync's manager lookup works as for AD).
- Permission: User.Read.All (application).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import structlog

from gateway.errors import AccessDenied, MailboxNotFound, NotFound, SyncStateInvalid
from gateway.sources.graph.client import Answer, GraphClient
from gateway.sync.people import DirectoryPerson, PeopleRead, Position

log = structlog.get_logger("gateway.sources.graph")

DIRECTORY = "directory"  # the mailbox label of directory requests (they address no mailbox)
SELECT = "id,displayName,mail,userPrincipalName,department,jobTitle,businessPhones,mobilePhone,accountEnabled"
DELTA_SELECT = SELECT + ",manager"  # the manager comes as manager@delta: a list of references


def person_of(u: dict[str, Any]) -> DirectoryPerson | None:
    """A person from a user (all of SELECT), or None when it has no mailbox."""
    mail = str(u.get("mail") or "").lower()
    if not mail or not u.get("id"):
        return None
    phones = [p for p in u.get("businessPhones") or () if isinstance(p, str) and p]
    # The manager by id, as the person's dn is their id: the sync relays the manager's address.
    refs = [u["manager"]] if isinstance(u.get("manager"), dict) else u.get("manager@delta") or []
    managers = [str(r["id"]) for r in refs if isinstance(r, dict) and r.get("id") and "@removed" not in r]
    return DirectoryPerson(id=str(u["id"]), email=mail, name=u.get("displayName"), upn=u.get("userPrincipalName"),
                           department=u.get("department"), title=u.get("jobTitle"),
                           phone=phones[0] if phones else u.get("mobilePhone"),
                           enabled=u.get("accountEnabled") is not False, dn=str(u["id"]),
                           manager=managers[0] if managers else None)


class GraphPeople:
    def __init__(self, client: GraphClient, source: str = "") -> None:
        self.client = client
        self.source = source

    async def read_changes(self, since: Position | None) -> PeopleRead:
        try:
            return await self._read(since)
        except AccessDenied as e:  # the client's remedy names the calendar permissions: this one is another
            raise AccessDenied(f"Graph refused to list the tenant's users ({e})",
                               remedy="grant the app registration the application permission User.Read.All with "
                                      f"admin consent, or remove people: from source {self.source or 'NAME'}") from e

    async def _read(self, since: Position | None) -> PeopleRead:
        values: list[dict[str, Any]] = []
        end: str | None = None
        if since is not None and since[1]:
            try:
                values, end = await self._round(since[1], delta=True)
            except SyncStateInvalid as e:
                log.info("graph.people_token_expired", reason=str(e))  # everyone is read again instead
        full = end is None
        if end is None:
            values, end = await self._round("/users/delta", params={"$select": DELTA_SELECT})
        rooms = await self._rooms()
        people: list[DirectoryPerson] = []
        deleted: list[str] = []
        changed: list[str] = []
        for u in values:
            uid = str(u.get("id") or "")
            if not uid:
                continue
            if "@removed" in u:
                deleted.append(uid)
            elif full:
                p = person_of(u)
                if p is not None and p.email not in rooms:
                    people.append(p)
            else:
                changed.append(uid)
        for uid, found in zip(changed, await self._users(changed), strict=True):
            p = person_of(found) if found is not None else None
            if p is None or p.email in rooms:
                deleted.append(uid)  # gone meanwhile, or no longer a person: removed, if it was one
            else:
                people.append(p)
        return PeopleRead(people, deleted, (0, end), full=full)

    async def _round(self, link: str, *, params: dict[str, str] | None = None, delta: bool = False,
                     ) -> tuple[list[dict[str, Any]], str]:
        """Every page of a delta round: (its values, its deltaLink)."""
        values: list[dict[str, Any]] = []
        first = True
        while True:
            answer = await self.client.call("GET", link, mailbox=DIRECTORY, operation="users_delta",
                                            params=params if first else None, delta=delta or not first)
            first = False
            values += [v for v in answer.body.get("value") or () if isinstance(v, dict)]
            following = answer.body.get("@odata.nextLink")
            if following:
                link = str(following)
                continue
            end = answer.body.get("@odata.deltaLink")
            if not end:
                raise SyncStateInvalid("Graph ended a /users/delta round without a deltaLink")
            return values, str(end)

    async def _users(self, ids: list[str]) -> list[dict[str, Any] | None]:
        """Changed users read whole, twenty to a request; None for one that is gone."""
        if not ids:
            return []
        answers = await self.client.batch([f"/users/{quote(uid)}?$select={SELECT}&$expand=manager($select=id)"
                                           for uid in ids],
                                          mailbox=DIRECTORY, operation="users")
        out: list[dict[str, Any] | None] = []
        for a in answers:
            if isinstance(a, Answer):
                out.append(a.body)
            elif isinstance(a, NotFound | MailboxNotFound):
                out.append(None)
            else:
                raise a
        return out

    async def _rooms(self) -> set[str]:
        """The addresses of the tenant's rooms (Places), which are users too."""
        places = await self.client.pages("/places/microsoft.graph.room", mailbox=DIRECTORY, operation="places",
                                         params={"$top": "100"})
        return {str(p.get("emailAddress") or "").lower() for p in places}
