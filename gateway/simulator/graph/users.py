"""Entra ID's users: ``/users`` (paged, ``$select``, the ``$filter`` forms a directory search uses), ``/users/{id}``
and ``/users/delta``, over the simulated organisation's mailboxes.

As in Entra ID, every mailbox is a user: people on either side (hybrid identities are synchronised), service
accounts, and the rooms of Exchange Online (resource accounts, ``accountEnabled`` false). A client that wants only
people has to leave the rooms out itself (the gateway does it by the Places list of rooms).

``/users/delta`` as Microsoft documents it: a first round lists every user; its pages are linked with
``$skiptoken`` and the round ends with a ``@odata.deltaLink`` carrying a ``$deltatoken``, with the round's
``$select`` frozen into the token (later requests carry none). A later round lists users created (in full), users
changed (their id and only the properties that changed, of those selected) and users deleted
(``{"id", "@removed": {"reason": "changed"}}`` for a soft delete, ``"deleted"`` for a permanent one). A token whose
state is gone (the control API expires it) answers ``410 Gone`` ``SyncStateNotFound``.

The manager is a relationship: selected in a delta it comes as ``manager@delta`` (a list of references), read with
``$expand=manager`` as ``manager``.

What a test changes (the control API, gateway/simulator/graph/control.py): users created, their properties
(``accountEnabled``, ``department``, ``jobTitle``, ``displayName``, ``manager``) and deletions.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.simulator.graph import ids
from gateway.simulator.graph.delta import delta_page
from gateway.simulator.graph.errors import GraphError, bad_request
from gateway.simulator.graph.reads import page_size, user_filter
from gateway.simulator.graph.router import GraphRequest, GraphResponse
from gateway.simulator.mailboxes import Mailbox

if TYPE_CHECKING:
    from gateway.simulator.graph.service import GraphService

USERS_PAGE = 100  # Graph's default page of users
MAX_STATES = 1_000  # delta states kept; the oldest go first (their tokens answer 410)
# What /users returns without $select (Graph's default set); the others only when selected.
DEFAULT_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "businessPhones", "givenName", "surname",
                  "jobTitle", "mobilePhone", "officeLocation", "preferredLanguage")
SETTABLE = ("displayName", "department", "jobTitle", "accountEnabled", "mobilePhone", "officeLocation", "manager")
_EXPAND_MANAGER = re.compile(r"^manager(\(\$select=[\w,]+\))?$", re.IGNORECASE)


@dataclass
class _Round:
    pending: list[dict[str, Any]]
    seen: dict[str, dict[str, Any]]  # the state the round ends in: user id -> what was selected of it
    select: tuple[str, ...] | None
    size: int


class Users:
    def __init__(self, graph: GraphService) -> None:
        self.graph = graph
        self.attrs: dict[str, dict[str, Any]] = {}  # smtp -> properties set through the control API
        self.deleted: dict[str, str] = {}  # smtp -> "changed" (soft-deleted) or "deleted" (permanently)
        self.states: OrderedDict[str, tuple[dict[str, dict[str, Any]], tuple[str, ...] | None]] = OrderedDict()
        self.rounds: OrderedDict[str, _Round] = OrderedDict()
        self.permitted = True  # the app holds User.Read.All (the control API takes it away)

    def add_routes(self) -> None:
        r = self.graph.router
        # before /users/{user}: the router takes the first pattern that matches
        r.add("GET", "/users/delta", self.delta)
        r.add("GET", "/users/microsoft.graph.delta", self.delta)
        r.add("GET", "/users", self.users)
        r.add("GET", "/users/{user}", self.user)

    # -- the directory ---------------------------------------------------------------------------------
    def everyone(self) -> list[Mailbox]:
        """Entra ID's users: every mailbox but the rooms on premises (not in this tenant's Places), less the
        deleted."""
        return [mb for mb in self.graph.sim.directory.by_idx
                if mb.smtp not in self.deleted and (mb.kind != "room" or mb.side == "graph")]

    def json(self, mb: Mailbox) -> dict[str, Any]:
        first, _, last = mb.name.partition(" ")
        u: dict[str, Any] = {
            "id": ids.object_id(mb.smtp), "displayName": mb.name, "mail": mb.smtp, "userPrincipalName": mb.smtp,
            "businessPhones": [], "givenName": first or None, "surname": last or None, "jobTitle": None,
            "mobilePhone": None, "officeLocation": None, "preferredLanguage": None,
            "accountEnabled": mb.kind != "room", "department": None, "manager": None}  # manager: the manager's id
        u.update(self.attrs.get(mb.smtp, {}))
        if mb.kind == "room":
            u["givenName"] = u["surname"] = None
        return u

    @staticmethod
    def selected(req: GraphRequest) -> tuple[str, ...] | None:
        raw = req.query.get("$select")
        if not raw:
            return None
        return tuple(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))

    @staticmethod
    def shape(u: dict[str, Any], select: tuple[str, ...] | None, req: GraphRequest | None = None,
              ) -> dict[str, Any]:
        """A user as ``$select`` (and ``$expand=manager``) shape it. The manager is a relationship: a delta
        selects it (``manager@delta``, a list of references), a read expands it (``manager``, omitted if none)."""
        fields = DEFAULT_FIELDS if select is None else ("id", *select)
        out = {k: u.get(k) for k in fields if k != "manager"}
        if "manager" in fields:
            out["manager@delta"] = [{"@odata.type": "#microsoft.graph.user", "id": u["manager"]}] \
                if u.get("manager") else []
        expand = req.query.get("$expand") if req is not None else None
        if expand:
            if not _EXPAND_MANAGER.match(expand.strip()):
                raise bad_request(f"The $expand '{expand}' is not supported by the simulator.",
                                  "Request_UnsupportedQuery")
            if u.get("manager"):
                out["manager"] = {"@odata.type": "#microsoft.graph.user", "id": u["manager"]}
        return out

    def find(self, user: str) -> Mailbox:
        mb = self.graph.directory_object(user)
        if mb.smtp in self.deleted:
            raise GraphError(404, "Request_ResourceNotFound", f"Resource '{user}' does not exist or one of its "
                                                              "queried reference-property objects are not present.")
        return mb

    def check_permission(self) -> None:
        if not self.permitted:
            raise GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")

    # -- routes ----------------------------------------------------------------------------------------
    async def users(self, req: GraphRequest) -> GraphResponse:
        self.check_permission()
        values = [self.json(mb) for mb in self.everyone()]
        flt = req.query.get("$filter")
        if flt:
            values = [u for u in values if user_filter(flt)(u)]
        select = self.selected(req)
        return self.graph.reads.page(req, [self.shape(u, select) for u in values], "users", default=USERS_PAGE)

    async def user(self, req: GraphRequest) -> GraphResponse:
        self.check_permission()
        u = self.shape(self.json(self.find(req.params["user"])), self.selected(req), req)
        return GraphResponse(200, {"@odata.context": self.graph.context("users/$entity"), **u})

    def _gone(self) -> GraphError:
        return GraphError(410, "SyncStateNotFound", "The sync state generation is not found; discard the token and "
                                                    "start a new synchronization.")

    async def delta(self, req: GraphRequest) -> GraphResponse:
        self.check_permission()
        unsupported = {"$filter", "$orderby", "$expand", "$search", "$count", "$skip"} & set(req.query)
        if unsupported:
            raise bad_request(f"The query option(s) {sorted(unsupported)} are not supported by the simulator's "
                              "user delta.", "Request_UnsupportedQuery")
        skip, token = req.query.get("$skiptoken"), req.query.get("$deltatoken")
        if skip is not None:
            rnd = self.rounds.pop(skip, None)
            if rnd is None:
                raise self._gone()
            return self._serve(rnd)
        if token is not None:
            state = self.states.get(token)
            if state is None:
                raise self._gone()
            self.states.move_to_end(token)
            seen, select = state
        else:
            seen, select = {}, self.selected(req)
        current = {u["id"]: self.shape(u, select) for u in (self.json(mb) for mb in self.everyone())}
        pending: list[dict[str, Any]] = []
        for uid, u in current.items():
            before = seen.get(uid)
            if before is None:
                pending.append(u)
            elif before != u:
                pending.append({"id": uid, **{k: v for k, v in u.items() if before.get(k) != v}})
        reasons = {ids.object_id(smtp): why for smtp, why in self.deleted.items()}
        pending += [{"id": uid, "@removed": {"reason": reasons.get(uid, "deleted")}}
                    for uid in sorted(set(seen) - set(current))]
        return self._serve(_Round(pending, current, select, page_size(req, USERS_PAGE)))

    def _serve(self, rnd: _Round) -> GraphResponse:
        return GraphResponse(200, delta_page(rnd, self.rounds, self.states, (rnd.seen, rnd.select),
                                             f"{self.graph.graph_url}/users/delta", self.graph.context("users"),
                                             limit=MAX_STATES))

    # -- what the control API changes ----------------------------------------------------------------
    def expire(self) -> int:
        """Forget every delta state: their tokens answer 410 from now on."""
        gone = len(self.states) + len(self.rounds)
        self.states.clear()
        self.rounds.clear()
        return gone

    def create(self, mail: str, values: dict[str, Any]) -> dict[str, Any]:
        d = self.graph.sim.directory
        mb = d.find(mail)
        if mb is None:
            mb = d.add_mailbox(mail, str(values.get("displayName") or mail.split("@")[0]), "user")
            mb.side = "graph"
        elif mb.smtp not in self.deleted:
            raise ValueError(f"the user {mail} exists already")
        self.deleted.pop(mb.smtp, None)  # a deleted one is restored
        return self.update(mb.smtp, values)

    def update(self, user: str, values: dict[str, Any]) -> dict[str, Any]:
        mb = self.find(user)
        unknown = sorted(set(values) - set(SETTABLE))
        if unknown:
            raise ValueError(f"unknown propert(ies) {unknown}; settable: {list(SETTABLE)}")
        if values.get("manager"):  # given by address or id, kept as the id
            values = {**values, "manager": ids.object_id(self.find(str(values["manager"])).smtp)}
        self.attrs.setdefault(mb.smtp, {}).update(values)
        return self.json(mb)

    def delete(self, user: str, *, permanent: bool = False) -> None:
        mb = self.find(user)
        self.deleted[mb.smtp] = "deleted" if permanent else "changed"
