"""What the simulator's work grows with (issue 13): serving N rooms must cost about N times serving one, and a call
no more than it must, or the simulator, not the gateway, is what a benchmark of thousands of rooms measures."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from gateway.simulator import schema
from gateway.simulator.notifications import NotificationHub
from gateway.simulator.seed import SERVICE_ACCOUNT, standard_org
from gateway.simulator.server import Simulator, SimulatorConfig


def test_subscribing_every_room_checks_each_subscription_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Simulator(SimulatorConfig())
    standard_org(sim.directory, rooms=400, users=1)
    service = sim.directory.get(f"{SERVICE_ACCOUNT}@contoso.com")
    checks = 0
    is_expired = NotificationHub._is_expired

    def counting(self: NotificationHub, s: Any) -> bool:
        nonlocal checks
        checks += 1
        return is_expired(self, s)
    monkeypatch.setattr(NotificationHub, "_is_expired", counting)
    rooms = list(sim.directory.rooms())
    assert len(rooms) == 400
    for room in rooms:
        sim.notifications.subscribe("streaming", room, service, 0, None, ["CreatedEvent"])
    assert len(sim.notifications.subscriptions) == 400
    # each Subscribe looks at its own mailbox's subscriptions, and at everyone's at most once a second
    assert checks <= 2 * len(rooms), f"{checks} expiry checks for {len(rooms)} subscriptions"


T = ('xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
     'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"')


def find_item(fields: str, view: str = 'StartDate="2026-01-01T00:00:00Z" EndDate="2026-02-01T00:00:00Z"',
              folder: str = '<t:DistinguishedFolderId Id="calendar"/>') -> etree._Element:
    uris = "".join(f'<t:FieldURI FieldURI="{u}"/>' for u in fields.split())
    return etree.fromstring(f'<m:FindItem {T} Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
                            f'<t:AdditionalProperties>{uris}</t:AdditionalProperties></m:ItemShape>'
                            f'<m:CalendarView {view}/><m:ParentFolderIds>{folder}</m:ParentFolderIds></m:FindItem>')


def test_a_shape_proven_valid_is_not_checked_again_but_the_rest_of_each_request_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[int] = []  # FieldURIs in each element the schema checks
    validate = schema.validate

    def counting(el: etree._Element) -> str | None:
        checked.append(sum(1 for _ in el.iter("{*}FieldURI")))
        return validate(el)
    monkeypatch.setattr(schema, "validate", counting)
    fields = "calendar:Start calendar:End item:Subject calendar:Organizer calendar:LegacyFreeBusyStatus " \
             "calendar:CalendarItemType calendar:IsCancelled"
    assert schema.validate_request(find_item(fields)) is None
    assert schema.validate_request(find_item(fields, 'StartDate="2026-03-01T00:00:00Z" '
                                                     'EndDate="2026-04-01T00:00:00Z"')) is None
    assert checked == [7, 0]  # the second request's shape was proven by the first
    request = find_item(fields)
    assert schema.validate_request(request) is None
    assert len(request.find("{*}ItemShape/{*}AdditionalProperties")) == 7  # the request itself is left as it was
    # the rest of a request with a proven shape is still checked
    assert "dateTime" in (schema.validate_request(find_item(fields, 'StartDate="soon" EndDate="later"')) or "")
    assert schema.validate_request(find_item(fields, folder='<t:FolderId/>')) is not None
    # a shape that is not valid is never taken as proven
    for _ in range(2):
        assert "FieldURI" in (schema.validate_request(find_item(fields + " calendar:NoSuchField")) or "")
