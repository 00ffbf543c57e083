"""Reading routes: calendarView (paged, in the requested time zone), events, one event with its
CleanGlobalObjectId, and the Places API's rooms and room lists."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gateway.simulator.calendar import CalendarItem, Instance
from gateway.simulator.graph import ids, shapes
from gateway.simulator.graph.errors import GraphError, bad_request, not_found
from gateway.simulator.graph.router import GraphRequest, GraphResponse
from gateway.simulator.mailboxes import Mailbox

if TYPE_CHECKING:
    from gateway.simulator.graph.service import GraphService

DEFAULT_PAGE = 10  # Outlook's default page of events
MAX_PAGE = 1000
PLACES_PAGE = 100
_EXPAND_SVEP = re.compile(r"singleValueExtendedProperties\(\$filter=id eq '([^']+)'\)", re.IGNORECASE)
_FILTER_SVEP = re.compile(r"singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id eq '([^']+)' and "
                          r"\1/value eq '((?:[^']|'')*)'\s*\)", re.IGNORECASE)


def add_routes(graph: GraphService) -> Reads:
    reads = Reads(graph)
    r = graph.router
    r.add("GET", "/users/{user}/calendarView", reads.calendar_view)
    r.add("GET", "/users/{user}/calendar/calendarView", reads.calendar_view)
    r.add("GET", "/users/{user}/events", reads.events)
    r.add("GET", "/users/{user}/calendar/events", reads.events)
    r.add("GET", "/users/{user}/events/{event}", reads.event)
    r.add("GET", "/users/{user}/events/{event}/instances", reads.instances)
    r.add("GET", "/places/microsoft.graph.room", reads.rooms)
    r.add("GET", "/places/microsoft.graph.roomlist", reads.room_lists)
    r.add("GET", "/places/{list}/microsoft.graph.roomlist/rooms", reads.rooms_in_list)
    r.add("GET", "/places/{place}", reads.place)
    return reads


def page_size(req: GraphRequest, default: int = DEFAULT_PAGE) -> int:
    raw = req.query.get("$top") or req.prefer("odata.maxpagesize")
    if raw is None:
        return default
    try:
        return max(1, min(MAX_PAGE, int(raw)))
    except ValueError as e:
        raise bad_request(f"Invalid page size '{raw}'.") from e


def preference_applied(req: GraphRequest, tz_name: str | None = None) -> dict[str, str]:
    applied = []
    if req.prefer("odata.maxpagesize") is not None:
        applied.append(f"odata.maxpagesize={page_size(req)}")
    if tz_name is not None and req.prefer("outlook.timezone") is not None:
        applied.append(f'outlook.timezone="{tz_name}"')
    return {"Preference-Applied": ", ".join(applied)} if applied else {}


class Reads:
    def __init__(self, graph: GraphService) -> None:
        self.graph = graph

    def render(self, mailbox: Mailbox, inst: Instance, req: GraphRequest, *, master: bool = False,
               tz_name: str | None = None) -> dict[str, Any]:
        tz, name = shapes.time_zone(tz_name if tz_name is not None else req.prefer("outlook.timezone"))
        rooms = [mb for a in inst.item.attendees() if (mb := self.graph.sim.directory.find(a.person.email))
                 is not None and mb.kind == "room"]
        return shapes.event_json(mailbox, inst, rooms, tz=tz, tz_name=name,
                                 transaction_id=self.graph.transactions.get(inst.item), master=master)

    def window(self, req: GraphRequest) -> tuple[datetime, datetime]:
        from gateway.simulator.graph.service import parse_instant

        q = {k.lower(): v for k, v in req.query.items()}
        if "startdatetime" not in q or "enddatetime" not in q:
            raise GraphError(400, "ErrorInvalidParameter", "This request requires a time window specified by the "
                             "query string parameters StartDateTime and EndDateTime.")
        start, end = parse_instant(q["startdatetime"], "startDateTime"), parse_instant(q["enddatetime"],
                                                                                         "endDateTime")
        if end <= start:
            raise GraphError(400, "ErrorInvalidParameter", "The parameter 'EndDateTime' must be after "
                                                           "'StartDateTime'.")
        return start, end

    def page(self, req: GraphRequest, values: Sequence[Any], context: str, headers: dict[str, str] | None = None,
             default: int = DEFAULT_PAGE, render: Callable[[Any], dict[str, Any]] | None = None) -> GraphResponse:
        """One page of ``values`` (rendered by ``render`` only for the page, when given) with its nextLink."""
        size = page_size(req, default)
        try:
            skip = int(req.query.get("$skip", "0"))
        except ValueError as e:
            raise bad_request("Invalid $skip.") from e
        chosen = list(values[skip:skip + size])
        body: dict[str, Any] = {"@odata.context": self.graph.context(context),
                                "value": [render(v) for v in chosen] if render is not None else chosen}
        if skip + size < len(values):
            body["@odata.nextLink"] = self.graph.next_link(req, **{"$top": str(size), "$skip": str(skip + size)})
        return GraphResponse(200, body, headers or {})

    # -- routes ----------------------------------------------------------------------------------------
    async def calendar_view(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        start, end = self.window(req)
        instances = sorted((inst for item in list(mb.calendar.items.values())
                            for inst in item.instances(start, end)),
                           key=lambda i: (i.start, i.item.iid, i.original_start or i.start))
        _, tz_name = shapes.time_zone(req.prefer("outlook.timezone"))
        return self.page(req, instances, f"users('{req.params['user']}')/calendarView",
                         preference_applied(req, tz_name), render=lambda inst: self.shaped(mb, inst, req))

    async def events(self, req: GraphRequest) -> GraphResponse:
        """Singles and series masters (not expanded), optionally those carrying one extended property value."""
        mb = self.graph.mailbox(req.params["user"])
        items: list[CalendarItem] = sorted(mb.calendar.items.values(), key=lambda i: (i.start, i.iid))
        flt = req.query.get("$filter")
        if flt:
            m = _FILTER_SVEP.fullmatch(flt.strip())
            if m is None:
                raise bad_request(f"The $filter '{flt}' is not supported by the simulator.", "ErrorInvalidUrlQuery")
            key = ext_key(m.group(2))
            value = m.group(3).replace("''", "'")
            items = [i for i in items if i.ext and str(i.ext.get(key)) == value]
        values = [self.shaped(mb, Instance(i, 0, None), req, master=i.recurrence is not None) for i in items]
        _, tz_name = shapes.time_zone(req.prefer("outlook.timezone"))
        return self.page(req, values, f"users('{req.params['user']}')/events", preference_applied(req, tz_name))

    async def event(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        master = inst.original_start is None and item.recurrence is not None
        body = self.shaped(mb, inst, req, master=master)
        body = {"@odata.context": self.graph.context(f"users('{req.params['user']}')/events/$entity"), **body}
        _, tz_name = shapes.time_zone(req.prefer("outlook.timezone"))
        return GraphResponse(200, body, preference_applied(req, tz_name))

    async def instances(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        if item.recurrence is None or inst.original_start is not None:
            raise not_found()
        start, end = self.window(req)
        values = [self.shaped(mb, i, req) for i in item.instances(start, end)]
        return self.page(req, values, f"users('{req.params['user']}')/events('{req.params['event']}')/instances")

    def shaped(self, mb: Mailbox, inst: Instance, req: GraphRequest, *, master: bool = False) -> dict[str, Any]:
        """An event as the request's ``$select`` and ``$expand`` shape it."""
        body = self.render(mb, inst, req, master=master)
        select = req.query.get("$select")
        if select:
            fields = {name.strip() for name in select.split(",") if name.strip()}
            body = {k: v for k, v in body.items() if k in fields or k in ("id", "@odata.etag")}
        expand = req.query.get("$expand")
        if expand:
            m = _EXPAND_SVEP.search(expand)
            if m is None:
                raise bad_request(f"The $expand '{expand}' is not supported by the simulator.",
                                  "ErrorInvalidUrlQuery")
            wanted = m.group(1)
            found = []
            if wanted.lower() == shapes.CLEAN_GOID_PROPERTY.lower():
                found.append(shapes.clean_goid_property(inst.item.goid))
            else:
                value = (inst.item.ext or {}).get(ext_key(wanted))
                if value is not None:
                    found.append({"id": wanted, "value": str(value)})
            body["singleValueExtendedProperties@odata.context"] = self.graph.context(
                f"users('{req.params['user']}')/events('{body['id']}')/singleValueExtendedProperties")
            body["singleValueExtendedProperties"] = found
        return body

    # -- places ----------------------------------------------------------------------------------------
    def _online_rooms(self) -> list[Mailbox]:
        return [mb for mb in self.graph.sim.directory.rooms() if mb.side == "graph"]

    async def rooms(self, req: GraphRequest) -> GraphResponse:
        return self.page(req, self._online_rooms(), "places/microsoft.graph.room", default=PLACES_PAGE,
                         render=shapes.room_json)

    async def room_lists(self, req: GraphRequest) -> GraphResponse:
        d = self.graph.sim.directory
        online = {mb.smtp for mb in self._online_rooms()}
        values = [shapes.room_list_json(smtp, name) for smtp, (name, members) in d.room_lists.items()
                  if online.intersection(members)]
        return self.page(req, values, "places/microsoft.graph.roomlist", default=PLACES_PAGE)

    async def place(self, req: GraphRequest) -> GraphResponse:
        """One room or room list by its address or id."""
        d = self.graph.sim.directory
        key = req.params["place"].lower()
        for smtp, (name, members) in d.room_lists.items():
            if key in (smtp, ids.object_id(smtp)) and any((m := d.find(r)) is not None and m.side == "graph"
                                                          for r in members):
                return GraphResponse(200, {"@odata.context": self.graph.context("places/$entity"),
                                           "@odata.type": "#microsoft.graph.roomList",
                                           **shapes.room_list_json(smtp, name)})
        for mb in self._online_rooms():
            if key in (mb.smtp, ids.object_id(mb.smtp)):
                return GraphResponse(200, {"@odata.context": self.graph.context("places/$entity"),
                                           "@odata.type": "#microsoft.graph.room", **shapes.room_json(mb)})
        raise GraphError(404, "ErrorItemNotFound", f"The place '{req.params['place']}' was not found.")

    async def rooms_in_list(self, req: GraphRequest) -> GraphResponse:
        d = self.graph.sim.directory
        key = req.params["list"].lower()
        found = d.room_lists.get(key) or next((v for k, v in d.room_lists.items() if ids.object_id(k) == key),
                                              None)
        if found is None:
            raise GraphError(404, "ErrorItemNotFound", f"The room list '{req.params['list']}' was not found.")
        rooms = [mb for smtp in found[1] if (mb := d.find(smtp)) is not None and mb.side == "graph"]
        return self.page(req, [shapes.room_json(mb) for mb in rooms],
                         f"places('{req.params['list']}')/microsoft.graph.roomlist/rooms", default=PLACES_PAGE)


_CLAUSE = re.compile(r"^\s*(?:startswith\((\w+),\s*'((?:[^']|'')*)'\)|(\w+) eq '((?:[^']|'')*)')\s*$", re.IGNORECASE)


def user_filter(flt: str) -> Callable[[dict[str, Any]], bool]:
    """The ``$filter`` forms a directory search uses: ``startswith(field,'x')`` and ``field eq 'x'``, or-ed."""
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for clause in re.split(r"\s+or\s+", flt.strip(), flags=re.IGNORECASE):
        m = _CLAUSE.match(clause)
        if m is None:
            raise bad_request(f"The $filter clause '{clause}' is not supported by the simulator.",
                              "Request_UnsupportedQuery")
        if m.group(1):
            tests.append(_clause(m.group(1), m.group(2).replace("''", "'").lower(), prefix=True))
        else:
            tests.append(_clause(m.group(3), m.group(4).replace("''", "'").lower(), prefix=False))
    return lambda u: any(t(u) for t in tests)


def _clause(field_: str, value: str, *, prefix: bool) -> Callable[[dict[str, Any]], bool]:
    def test(user: dict[str, Any]) -> bool:
        have = str(user.get(field_) or "").lower()
        return have.startswith(value) if prefix else have == value
    return test


def ext_key(graph_id: str) -> tuple[str, str, str]:
    """A singleValueExtendedProperty id (``String {guid} Name X``, ``Binary {guid} Id 0x23``, ``String 0x37``)
    as the key the EWS side stores the same property under (gateway/simulator/mapi.py)."""
    from gateway.simulator.mapi import SET_ALIASES

    parts = graph_id.split()
    if len(parts) == 2:  # a tagged property: "String 0x0037"
        return ("tag", str(int(parts[1], 16)), parts[0])
    if len(parts) >= 4 and parts[2].lower() in ("name", "id"):
        guid = parts[1].strip("{}").lower()
        pset = SET_ALIASES.get(guid, guid)
        name = " ".join(parts[3:])
        if parts[2].lower() == "id":
            name = str(int(name, 16) if name.lower().startswith("0x") else int(name))
        return (pset, name, parts[0])
    raise bad_request(f"The extended property id '{graph_id}' is not valid.", "ErrorInvalidProperty")
