"""The rooms' Resource Booking Attendant. Placeholder until the full attendant lands."""

from __future__ import annotations

from typing import Any


class BookingAttendant:
    def __init__(self, sim: Any) -> None:
        self.sim = sim
