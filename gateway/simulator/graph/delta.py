"""``calendarView/delta``: a first round lists every instance in the window, later rounds what changed since.

Pages are linked with ``$skiptoken`` and a round ends with a ``@odata.deltaLink`` carrying a ``$deltatoken``; the
window (start and end) is frozen into the token, as in Graph. A token names a state kept here (what each event
looked like when the round ended); when that state is gone (the control API expires it, or too many accumulate)
the answer is ``410 Gone`` with ``SyncStateNotFound`` (as Exchange Online spells it; ``resyncRequired`` on
request), after which a client must start a fresh round. Events that leave the window or the calendar come back
as ``{"@odata.type", "id", "@removed": {"reason": "deleted"}}``.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from gateway.simulator.calendar import Instance
from gateway.simulator.graph import ids
from gateway.simulator.graph.errors import GraphError, bad_request
from gateway.simulator.graph.reads import page_size, preference_applied
from gateway.simulator.graph.router import GraphRequest, GraphResponse
from gateway.simulator.graph.shapes import time_zone

if TYPE_CHECKING:
    from gateway.simulator.graph.reads import Reads
    from gateway.simulator.graph.service import GraphService

MAX_STATES = 20_000  # sync states kept; the oldest go first (a client holding one gets 410)


@dataclass
class SyncState:
    mailbox: str
    start: datetime
    end: datetime
    seen: dict[str, str]  # event id -> its version when the round ended


@dataclass
class Round:
    """A round being paged through: the changes still to hand out and the state it ends in."""

    state: SyncState
    pending: list[dict[str, Any]]
    size: int
    tz_name: str | None = None
    served: int = field(default=0)


def fingerprint(inst: Instance) -> str:
    """What a delta round compares. Every change to an item bumps its version (its ChangeKey); an occurrence
    is compared by what it shows, so a change to one occurrence does not report every other one as updated."""
    item = inst.item
    if inst.original_start is None:
        return str(item.version)
    exc = inst.exception
    responses = ",".join(a.response for a in item.attendees())
    return "|".join(map(str, (exc.version if exc is not None else 0, inst.start, inst.end, inst.subject,
                              inst.location, inst.free_busy, item.my_response, item.is_cancelled, item.sensitivity,
                              item.organizer.email if item.organizer else "", responses)))


class Delta:
    def __init__(self, graph: GraphService, reads: Reads) -> None:
        self.graph = graph
        self.reads = reads
        self.states: OrderedDict[str, SyncState] = OrderedDict()
        self.rounds: OrderedDict[str, Round] = OrderedDict()
        self.expired_code = "SyncStateNotFound"  # or resyncRequired (the control API chooses)
        r = graph.router
        r.add("GET", "/users/{user}/calendarView/delta", self.delta)
        r.add("GET", "/users/{user}/calendar/calendarView/delta", self.delta)

    def expire(self, mailbox: str | None = None, code: str = "SyncStateNotFound") -> int:
        """Forget sync states (of one mailbox, or all): their tokens answer 410 from now on."""
        self.expired_code = code
        gone = [t for t, s in self.states.items() if mailbox is None or s.mailbox == mailbox.lower()]
        gone_rounds = [t for t, r in self.rounds.items() if mailbox is None or r.state.mailbox == mailbox.lower()]
        for t in gone:
            del self.states[t]
        for t in gone_rounds:
            del self.rounds[t]
        return len(gone) + len(gone_rounds)

    def _gone(self) -> GraphError:
        return GraphError(410, self.expired_code, "The sync state generation is not found; discard the token and "
                                                  "start a new synchronization.")

    async def delta(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        skip, token = req.query.get("$skiptoken"), req.query.get("$deltatoken")
        unsupported = {"$select", "$filter", "$orderby", "$expand", "$search"} & set(req.query)
        if unsupported:
            raise bad_request(f"The query option(s) {sorted(unsupported)} are not supported with delta.",
                              "ErrorInvalidUrlQueryFilter")
        if skip is not None:
            rnd = self.rounds.get(skip)
            if rnd is None or rnd.state.mailbox != mb.smtp:
                raise self._gone()
            del self.rounds[skip]
            return self._serve(req, rnd)
        if token is not None:
            previous = self.states.get(token)
            if previous is None or previous.mailbox != mb.smtp:
                raise self._gone()
            self.states.move_to_end(token)
            start, end, seen = previous.start, previous.end, previous.seen
        else:
            start, end = self.reads.window(req)
            seen = {}
        current: dict[str, str] = {}
        changed = []
        for item in list(mb.calendar.items.values()):
            for inst in item.instances(start, end):
                event_id = ids.event_id(mb.idx, item.iid, inst.original_start)
                print_ = fingerprint(inst)
                current[event_id] = print_
                if seen.get(event_id) != print_:
                    changed.append(inst)
        tz_name = req.prefer("outlook.timezone")
        pending: list[dict[str, Any]] = [self.reads.render(mb, inst, req, tz_name=tz_name) for inst in changed]
        pending.sort(key=lambda e: (e["start"]["dateTime"], e["id"]))
        for gone in sorted(set(seen) - set(current)):
            pending.append({"@odata.type": "#microsoft.graph.event", "id": gone, "@removed": {"reason": "deleted"}})
        rnd = Round(SyncState(mb.smtp, start, end, current), pending, page_size(req), tz_name)
        return self._serve(req, rnd)

    def _serve(self, req: GraphRequest, rnd: Round) -> GraphResponse:
        base = f"{self.graph.graph_url}/users/{req.params['user']}/calendarView/delta"
        body = delta_page(rnd, self.rounds, self.states, rnd.state, base, self.graph.context("Collection(event)"))
        _, tz_name = time_zone(rnd.tz_name)
        return GraphResponse(200, body, preference_applied(req, tz_name))


class Paged(Protocol):
    """A delta round being paged through: the changes still to hand out, so many a page."""

    pending: list[dict[str, Any]]
    size: int


def delta_page(rnd: Paged, rounds: OrderedDict[str, Any], states: OrderedDict[str, Any], final: Any, base: str,
               context: str, limit: int = MAX_STATES) -> dict[str, Any]:
    """The next page of a delta round, as Graph writes it: its share of the pending changes, then a nextLink (the
    round kept under a skip token) or, on its last page, a deltaLink (``final``, the state the round ends in, kept
    under a delta token). Beyond ``limit`` rounds or states the oldest are forgotten: their tokens answer 410."""
    page, rnd.pending = rnd.pending[:rnd.size], rnd.pending[rnd.size:]
    body: dict[str, Any] = {"@odata.context": context, "value": page}
    token = secrets.token_urlsafe(24)
    if rnd.pending:
        kept = rounds
        rounds[token] = rnd
        body["@odata.nextLink"] = f"{base}?$skiptoken={token}"
    else:
        kept = states
        states[token] = final
        body["@odata.deltaLink"] = f"{base}?$deltatoken={token}"
    while len(kept) > limit:
        kept.popitem(last=False)
    return body
