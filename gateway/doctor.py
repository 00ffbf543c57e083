"""`gateway doctor`: the report, and the Exchange checks, done the way the gateway will do them.

The logon is checked once, on its own, before any room (GetRoomLists, as the service account): when it fails, every
room would fail alike, so the report says so in one line and checks no room (a wrong password costs one failed
logon, not one per room). Each room is then checked with what the gateway will use: its mailbox and the right to
impersonate it, what the directory says it is (a person's mailbox is a warning, ``not_a_room``), a SyncFolderItems,
a subscription of the configured kind (subscribed and removed at once) and, when commands are enabled, an
availability call. A failure that every room shares is one line, not one per room.

Every remedy that names a gateway command names it with ``--config PATH``, the file actually used.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.app import GatewayOptions
from gateway.config import PrivacyConfig, unknown_privacy_rooms
from gateway.errors import GatewayError, is_shared
from gateway.model import ROOM_STATES
from gateway.sources.ews.source import EwsSource
from gateway.sources.ews.streaming import check_subscription
from gateway.sources.ews.writer import EwsWriter

_COMMAND = re.compile(r"`(gateway [^`]*)`")


def with_config(text: str, config: Path | None) -> str:
    """``text`` with ``--config PATH`` added to every `gateway ...` command it names (unless it has one)."""
    if config is None:
        return text

    def add(m: re.Match[str]) -> str:
        command = m.group(1)
        if "--config" in command:
            return m.group(0)
        return f"`{command} --config {shlex.quote(str(config))}`"
    return _COMMAND.sub(add, text)


class Report:
    """One line per check: a mark (ok, warn, FAIL, skip), what was checked, a stable key and what to do."""

    def __init__(self, config: Path | None) -> None:
        self.config = config
        self.failed = False
        self.warnings = 0

    def line(self, mark: str, what: str, key: str = "ok", text: str = "") -> None:
        self.failed = self.failed or mark == "FAIL"
        self.warnings += mark == "warn"
        text = with_config(text, self.config)
        print(f"{mark:<4}  {what:<48} {key}{'  -> ' + text if text else ''}")

    def ok(self, what: str) -> None:
        self.line("ok", what)

    def error(self, what: str, e: GatewayError, mark: str = "FAIL") -> None:
        self.line(mark, what, e.key, explain(e))

    def summary(self) -> None:
        again = with_config("run `gateway doctor` again", self.config)
        if self.failed:
            print(f"some checks failed: fix them and {again}")
        elif self.warnings:
            print(f"no check failed ({self.warnings} warning{'s' if self.warnings > 1 else ''} above): all green")
        else:
            print("all green")


def explain(e: GatewayError) -> str:
    """The error's words (with its detail) and its remedy."""
    reason = (str(e.args[0]) if e.args else "").rstrip(".")
    remedy = e.remedy or ROOM_STATES.get(e.key, "")
    return "; ".join(t for t in (reason, remedy) if t)


@dataclass(frozen=True)
class Finding:
    mark: str  # ok, warn, FAIL
    key: str = "ok"
    text: str = ""
    shared_text: str = ""  # the same finding worded for every room at once


async def check_exchange(source: EwsSource, options: GatewayOptions, report: Report,
                         privacy: PrivacyConfig | None = None) -> None:
    """The logon, the room lists and every room (see the module's docstring). ``privacy``: its per-room exceptions
    must name a room that is configured or in a room list (checked once the lists are read)."""
    where = f"Exchange {options.ews.ews_url} as {options.ews.username}"
    listed: set[str] | None = None  # every room in a room list (None: the lists could not be read)
    try:
        lists = await source.room_lists()
        report.ok(where)
    except GatewayError as e:
        if is_shared(e):
            report.error(where, e)
            count = len(options.rooms) + len(options.room_lists)
            report.line("skip", f"rooms and room lists ({count})", "not_checked",
                        "every room needs the logon that failed above; fix it first")
            return
        report.ok(where)  # Exchange answered (and judged the account), only the room lists are not available
        lists = None
    rooms, lists_read = list(options.rooms), True
    for room_list in options.room_lists:
        try:
            members = await source.room_list_members(room_list)
        except GatewayError as e:
            lists_read = False
            report.error(f"room list {room_list}", e)
            continue
        report.line("ok" if members else "FAIL", f"room list {room_list}", "ok" if members else "room_list_empty",
                    "" if members else f"the room list {room_list} has no rooms; check its membership")
        rooms += members
    if lists_read and privacy is not None:
        # A privacy exception for none of the rooms is a typo (the configuration checks it when there are no lists).
        for room, problem in unknown_privacy_rooms(privacy, rooms):
            report.line("FAIL", f"configuration rooms.privacy.rooms.{room}", "invalid_config", problem)
    if lists is not None:
        listed = set()
        for room_list in lists:
            try:
                listed.update(await source.room_list_members(room_list))
            except GatewayError:
                continue
    if not rooms:
        report.line("FAIL", "rooms", "no_rooms",
                    "list room mailboxes (rooms.mailboxes) or room lists (rooms.room_lists)")
        return
    names = sorted({r.lower() for r in rooms})
    slots = asyncio.Semaphore(max(1, options.ews.max_workers))

    async def one(room: str) -> list[Finding]:
        async with slots:
            return await check_room(source, options, room, listed)
    results = dict(zip(names, await asyncio.gather(*(one(r) for r in names))))
    _print_rooms(report, results)


async def check_room(source: EwsSource, options: GatewayOptions, room: str,
                     listed: set[str] | None) -> list[Finding]:
    """The findings for one room, in the order the gateway meets them; a failure ends the room's checks."""
    findings: list[Finding] = []

    async def step(what: str, call: Awaitable[Any]) -> bool:
        try:
            await call
            return True
        except GatewayError as e:
            key = {"invalid_auth": "auth_required"}.get(e.key, e.key)
            text = f"{what}: {explain(e)}"
            findings.append(Finding("FAIL", key, text, text.replace(room, "each room")))
        except Exception as e:  # not an answer EWS specifies (a malformed response): the gateway would fail alike
            text = f"{what}: Exchange's answer cannot be read ({type(e).__name__}: {e})"
            findings.append(Finding("FAIL", "unexpected_answer", text, text.replace(room, "each room")))
        return False

    if not await step("mailbox", source.verify(room)):
        return findings
    if listed is None or room not in listed:
        try:
            kind, name = await source.mailbox_kind(room)
        except GatewayError:
            kind, name = "unknown", None
        if kind == "person":
            findings.append(Finding("warn", "not_a_room",
                                    f"{room} is a person's mailbox ({name}), not a room: bookings would be read from "
                                    "a private calendar; check rooms.mailboxes"))
        elif kind == "group":
            findings.append(Finding("warn", "not_a_room",
                                    f"{room} is a distribution group ({name}); a room list belongs under "
                                    "rooms.room_lists"))
    if not await step("SyncFolderItems", source.check_sync(room)):
        return findings
    feed = options.feed
    if feed in ("streaming", "pull") and not await step(f"{feed} subscription",
                                                         check_subscription(source, room, feed)):
        return findings
    if options.commands.enabled:
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        if not await step("availability", EwsWriter(source).availability([room], start, start + timedelta(hours=1))):
            return findings
    return findings


def _print_rooms(report: Report, results: dict[str, list[Finding]]) -> None:
    """One line per room, except that a failure several rooms share is one line for all of them."""
    groups: dict[tuple[str, str], list[str]] = {}
    for room, found in results.items():
        failure = next((f for f in found if f.mark == "FAIL"), None)
        if failure is not None:
            groups.setdefault((failure.key, failure.shared_text), []).append(room)
    shared = {room for members in groups.values() if len(members) > 1 for room in members}
    for (key, text), members in groups.items():
        if len(members) < 2:
            continue
        if len(members) == len(results):
            report.line("FAIL", f"rooms (all {len(results)})", key, text)
        else:
            names = ", ".join(members[:3]) + (f" and {len(members) - 3} more" if len(members) > 3 else "")
            report.line("FAIL", f"rooms ({len(members)} of {len(results)})", key, f"{names}: {text}")
    for room, found in results.items():
        bad = [f for f in found if f.mark != "ok" and not (f.mark == "FAIL" and room in shared)]
        if not bad and room not in shared:
            report.ok(f"room {room}")
        for f in bad:
            report.line(f.mark, f"room {room}", f.key, f.text)
