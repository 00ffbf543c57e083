"""Readiness, derived from the states of the running parts: the gateway is ready unless a part says why not.

A source is ready when it owns no rooms or when at least one of its rooms is in sync: one broken room is a broken
room (its state says so, on /v1/rooms), not a broken gateway, while a source none of whose rooms syncs (refused
credentials, Exchange unreachable, still importing) is. A gateway that owns no rooms at all (a replica with nothing
to do) is ready. The reasons go to an open endpoint (/readyz), so they name parts and counts of room states, never
addresses or error texts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# suspect_empty: reachable and read, only its content is held; polling: in sync, only slower (its feed restarts)
IN_SYNC = frozenset({"verified", "polling", "suspect_empty"})


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Part:
    """One running part as readiness sees it: ``problem`` empty while it is fine."""

    name: str  # "source onprem", "feed of onprem"; empty for the gateway's rooms as a whole
    problem: str = ""


def readiness(parts: Iterable[Part]) -> Readiness:
    reasons = tuple(f"{p.name}: {p.problem}" if p.name else p.problem for p in parts if p.problem)
    return Readiness(not reasons, reasons)


def source_part(name: str, room_states: Iterable[str]) -> Part:
    """A source, judged by its rooms' states."""
    states = Counter(room_states)
    if not states or IN_SYNC & set(states):
        return Part(f"source {name}")
    counts = ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
    return Part(f"source {name}", f"no room in sync yet ({counts})")


def unread_part(name: str, key: str) -> Part:
    """A source that owns no rooms only because its room lists could not be read yet (refused credentials, Exchange
    away): not ready until they are read, unlike a source that owns no rooms."""
    return Part(f"source {name}", f"its room lists could not be read yet ({key}), so it has no rooms")


def rooms_part(room_states: Iterable[str]) -> Part:
    """Every room of the gateway: while none at all is in sync, their states counted, most first, and where each
    room's reason and remedy are."""
    states = Counter(room_states)
    if not states or IN_SYNC & set(states):
        return Part("")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items(), key=lambda kv: -kv[1]))
    return Part("", f"no room is in sync ({counts}); see /v1/rooms or `gateway rooms` for each room's reason and "
                    "remedy")


CREDENTIAL_PROBLEMS = {"locked_out": "the account is locked out", "disabled": "the account is disabled",
                       "expired": "it has expired"}


def credential_part(credential: str, problem: str) -> Part:
    """A source's credential that stops it (locked out, disabled, expired), named so that the reason for its rooms'
    states is on /readyz too; its end date and remedy are in `gateway doctor` and `gateway rooms`."""
    return Part(f"credential {credential}", f"{CREDENTIAL_PROBLEMS.get(problem, problem)}; see `gateway doctor`")

