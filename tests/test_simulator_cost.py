"""What the simulator's work grows with (issue 13): serving N rooms must cost about N times serving one, or the
simulator, not the gateway, is what a benchmark of thousands of rooms measures."""

from __future__ import annotations

from typing import Any

import pytest

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
