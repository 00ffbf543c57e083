"""Who the organizer of a cloud booking is, asked of the organisation's directory, and what the ``commands:`` policy
makes of it (unknown_organizer, disabled_organizer, booking_group).

The people sync's snapshot in the store answers first (no LDAP request per command); someone it does not hold yet,
or every organizer when a booking group is configured (membership is nested, so only the directory can tell), is
looked up in the directory itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.config import CommandsConfig

State = Literal["enabled", "disabled", "unknown"]


@dataclass(frozen=True, slots=True)
class Organizer:
    state: State
    member: bool | None = True  # of the booking group (True when none is configured; None: no such group)


class OrganizerDirectory(Protocol):
    """What the lookup needs of a directory (gateway/directory/ldap.py)."""

    async def organizer(self, email: str, group: str | None) -> tuple[bool, bool | None] | None:
        """(enabled, a member of ``group``, nested membership included; True without a group, None if the directory
        has no such group), or None: unknown."""
        ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with the organizer: book as a meeting (``meeting``), as an external booker, or refuse (``why``)."""

    action: Literal["meeting", "external", "refuse"]
    why: str = ""


class OrganizerCheck:
    def __init__(self, directory: OrganizerDirectory, settings: CommandsConfig, *,
                 people: Callable[[], Mapping[str, Any]] | None = None,
                 people_state: Callable[[], object] | None = None) -> None:
        self._directory = directory
        self._settings = settings
        self._people = people  # the store's people snapshot: id -> KnownPerson (its data has email and enabled)
        self._people_state = people_state  # changes whenever the people sync commits (None: read every time)
        self._index: dict[str, bool] = {}  # address -> enabled, built from the snapshot ...
        self._indexed: object = None  # ... as of this people state

    def _enabled_by_address(self) -> dict[str, bool]:
        """The snapshot by address, read again only after the people sync committed (blocking: run in a thread)."""
        assert self._people is not None
        state = self._people_state() if self._people_state is not None else None
        if state is None or state != self._indexed:
            index: dict[str, bool] = {}
            for known in self._people().values():
                data = getattr(known, "data", {})
                if data.get("email"):
                    index[str(data["email"]).lower()] = bool(data.get("enabled", True))
            self._index, self._indexed = index, state
        return self._index

    async def lookup(self, email: str) -> Organizer:
        group = self._settings.booking_group
        address = email.strip().lower()
        if group is None and self._people is not None:
            enabled = (await asyncio.to_thread(self._enabled_by_address)).get(address)
            if enabled is not None:
                return Organizer("enabled" if enabled else "disabled")
        found = await self._directory.organizer(address, group)
        if found is None:
            return Organizer("unknown", member=group is None)
        enabled, member = found
        return Organizer("enabled" if enabled else "disabled", member=member)

    async def verdict(self, email: str) -> Verdict:
        s = self._settings
        who = await self.lookup(email)
        if who.state == "unknown":
            if s.booking_group is not None:  # the group limits who may book: someone unknown is no member
                return Verdict("refuse", f"the organizer {email} is not in the organisation's directory, so not a "
                                         f"member of {s.booking_group}, the group that may book through the cloud "
                                         "(commands.booking_group); book as a member of it")
            if s.unknown_organizer == "refuse":
                return Verdict("refuse", f"the organizer {email} is not in the organisation's directory and the "
                                         "gateway's policy refuses unknown organizers (commands.unknown_organizer: "
                                         "refuse); book as a directory user, or set it to external")
            return Verdict("external")
        if who.state == "disabled":
            if s.disabled_organizer == "refuse":
                return Verdict("refuse", f"the organizer {email} has a disabled account in the organisation's "
                                         "directory (commands.disabled_organizer: refuse); enable the account, or "
                                         "set commands.disabled_organizer: external")
            return Verdict("external")
        if who.member is None:
            return Verdict("refuse", f"the booking group {s.booking_group} is not in the organisation's directory, so "
                                     "nobody can be a member; correct commands.booking_group (a group's DN or address)")
        if not who.member:
            return Verdict("refuse", f"the organizer {email} is not a member of {s.booking_group}, the group that may "
                                     "book through the cloud (commands.booking_group); add them to it")
        return Verdict("meeting")
