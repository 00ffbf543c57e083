"""`gateway doctor`: the report, and the Exchange checks, done the way the gateway will do them.

Every configured source is opened through its kind (gateway/sources/registry.py). The directory is asked about its
account first: while it says the account is locked out, no logon is tried (it would only prolong the lockout). Its
logon is checked once, on its own, before any room (the directory's room lists: GetRoomLists, as the service
account): when it fails, every room would fail alike, so the report says so in one line and checks no room (a wrong
password costs one failed logon, not one per room). Each room is then checked with what the gateway will use: its
mailbox and the right to impersonate it, what the directory says it is (a person's mailbox is a warning,
``not_a_room``), a SyncFolderItems, a subscription of the configured kind (subscribed and removed at once) and, when
commands are enabled, an availability call. A Graph room: its mailbox, a delta, a subscription with the hub's URLs
when a relay is configured (Graph validates them through the hub: the notification path), availability. Other kinds:
their mailbox, and availability. A failure that every room shares is one line, not one per room; a room in two
sources fails.

Every remedy that names a gateway command names it with ``--config PATH``, the file actually used.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from gateway.app import GatewayOptions
from gateway.config import PrivacyConfig, unknown_privacy_rooms
from gateway.credential_watch import Watched, check_all, describe, problem_of, remedy, source_watched
from gateway.errors import GatewayError, is_shared
from gateway.model import ROOM_STATES
from gateway.observability.metrics import Metrics
from gateway.ports import CredentialExpiry, OpenedSource, SourceSpec
from gateway.sources.ews.directory import EwsDirectory
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.streaming import check_subscription
from gateway.sources.graph.feed import check_subscription as check_graph_subscription
from gateway.sources.graph.source import GraphSource
from gateway.sources.registry import SourceRegistry, default_registry

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


async def check_sources(options: GatewayOptions, report: Report, privacy: PrivacyConfig | None = None, *,
                        registry: SourceRegistry | None = None) -> None:
    """Every configured source, opened through its kind (gateway/sources/registry.py), checked in turn (see the
    module's docstring); a room in two sources fails. ``privacy``: its per-room exceptions must name a room that is
    configured or in a room list (checked once every list is read)."""
    kinds = (registry or default_registry()).kinds(Metrics().registry)
    specs = options.calendar_sources
    rooms: list[str] = []
    lists_read = logon_ok = True
    owner: dict[str, str] = {}
    for spec in specs:
        label = f"{spec.name}: " if len(specs) > 1 else ""
        opened = kinds(spec.kind).open(spec, replace(options.feed_settings, mode="poll"))
        try:
            watched = source_watched(spec.name, spec.settings, opened, options.accounts,
                                     options.secret_entries.get(spec.name))
            if options.accounts is not None:  # the directory's word first: it holds the logon of a locked account
                await check_all([w for w in watched if w.kind == "password"])
            found = await check_source(spec, opened, options, report, label, owner)
            await check_credentials(watched, report, options.credentials.warn_days)  # with what the logon found
        finally:
            await opened.close()
        if found is None:  # the logon failed: its rooms cannot be checked (nor are they missing)
            lists_read = logon_ok = False
            continue
        members, read = found
        rooms += members
        lists_read = lists_read and read
    if lists_read and privacy is not None:
        # A privacy exception for none of the rooms is a typo (the configuration checks it when there are no lists).
        for room, problem in unknown_privacy_rooms(privacy, rooms):
            report.line("FAIL", f"configuration rooms.privacy.rooms.{room}", "invalid_config", problem)
    if not rooms and logon_ok:
        report.line("FAIL", "rooms", "no_rooms",
                    "list room mailboxes (rooms.mailboxes) or room lists (rooms.room_lists)")


async def check_source(spec: SourceSpec, opened: OpenedSource, options: GatewayOptions, report: Report, label: str,
                       owner: dict[str, str]) -> tuple[list[str], bool] | None:
    """The logon, the room lists and every room of one source: (its rooms, whether every list was read), or None
    when the logon failed."""
    settings = spec.settings
    ews = isinstance(opened.calendar, EwsSource) and isinstance(settings, EwsSettings)
    where = (f"{label}Exchange {settings.ews_url} as {settings.username}" if isinstance(settings, EwsSettings)
             else f"source {spec.name} ({spec.kind})")
    directory = opened.directory
    listed: set[str] | None = None  # every room in a room list (None: the lists could not be read)
    lists: list[str] | None = None
    if directory is not None:
        try:
            lists = [r.email for r in await directory.room_lists()]  # as the service account: the logon check
            report.ok(where)
        except GatewayError as e:
            if is_shared(e):
                report.error(where, e)
                count = len(spec.rooms) + len(spec.room_lists)
                report.line("skip", f"{label}rooms and room lists ({count})", "not_checked",
                            "every room needs the logon that failed above; fix it first")
                return None
            report.ok(where)  # the source answered (and judged the account), only the room lists are not available
    members_of, lists_read = list(spec.rooms), True
    for room_list in spec.room_lists:
        try:
            if directory is None:
                raise GatewayError(f"a source of kind {spec.kind} has no room lists", key="no_directory",
                                   remedy="list its rooms under mailboxes")
            members = [r.email for r in await directory.rooms(room_list)]
        except GatewayError as e:
            lists_read = False
            report.error(f"{label}room list {room_list}", e)
            continue
        report.line("ok" if members else "FAIL", f"{label}room list {room_list}",
                    "ok" if members else "room_list_empty",
                    "" if members else f"the room list {room_list} has no rooms; check its membership")
        members_of += members
    if lists is not None and directory is not None:
        listed = set()
        for room_list in lists:
            try:
                listed.update(r.email for r in await directory.rooms(room_list))
            except GatewayError:
                continue
    names: list[str] = []
    for room in sorted({r.lower() for r in members_of}):
        if owner.setdefault(room, spec.name) != spec.name:
            report.line("FAIL", f"{label}room {room}", "room_in_two_sources",
                        f"it belongs to source '{owner[room]}' too; remove it from one of them")
            continue
        names.append(room)
    slots = asyncio.Semaphore(max(1, settings.max_workers if isinstance(settings, EwsSettings) else 4))

    urls = spec.inbox.urls() if spec.inbox is not None else None  # Graph: the hub's notification path
    if isinstance(opened.calendar, GraphSource) and urls is None:
        report.line("skip", f"{label}change notifications through the hub", "not_checked",
                    "the hub tells its notification URLs once the tunnel is up: `gateway run` subscribes the rooms "
                    "then (and polls them until)" if spec.inbox is not None else
                    "no relay is configured: the rooms are polled (sources[N].poll_interval_seconds)")

    async def one(room: str) -> list[Finding]:
        async with slots:
            return await check_room(opened, options, room, listed, ews=ews, notify_urls=urls)
    results = dict(zip(names, await asyncio.gather(*(one(r) for r in names)), strict=True))
    _print_rooms(report, results, label)
    return names, lists_read


async def check_room(opened: OpenedSource, options: GatewayOptions, room: str, listed: set[str] | None, *,
                     ews: bool, notify_urls: tuple[str, str] | None = None) -> list[Finding]:
    """The findings for one room, in the order the gateway meets them; a failure ends the room's checks. ``ews``:
    the EWS checks besides (what the directory says the address is, SyncFolderItems, a subscription). A Graph
    room: a delta, and a subscription through the hub's ``notify_urls`` when a relay is configured."""
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
            text = f"{what}: the answer cannot be read ({type(e).__name__}: {e})"
            findings.append(Finding("FAIL", "unexpected_answer", text, text.replace(room, "each room")))
        return False

    if not await step("mailbox", opened.calendar.verify(room)):
        return findings
    source, directory = opened.calendar, opened.directory
    if ews and isinstance(source, EwsSource):
        if (listed is None or room not in listed) and isinstance(directory, EwsDirectory):
            try:
                kind, name = await directory.mailbox_kind(room)
            except GatewayError:
                kind, name = "unknown", None
            if kind == "person":
                findings.append(Finding("warn", "not_a_room",
                                        f"{room} is a person's mailbox ({name}), not a room: bookings would be read "
                                        "from a private calendar; check rooms.mailboxes"))
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
    if isinstance(source, GraphSource):
        if not await step("delta", source.check_sync(room)):
            return findings
        if notify_urls is not None and not await step(
                "subscription through the hub", check_graph_subscription(source.client, room, notify_urls)):
            return findings
    if options.commands.enabled and opened.writer is not None:
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        if not await step("availability", opened.writer.availability([room], start, start + timedelta(hours=1))):
            return findings
    return findings


async def check_credentials(watched: list[Watched], report: Report, warn_days: tuple[int, ...]) -> None:
    """One line per credential: when it ends, a warning when that is close, a failure when it has passed or the
    account is locked out or disabled, each with its remedy (gateway/credential_watch.py)."""
    now = datetime.now(UTC)
    for w, found, _ in await check_all(watched):
        for expiry in found:
            credential_line(report, expiry, w.entry, now, warn_days)


class GroupLookup(Protocol):
    async def group(self, name: str) -> str | None:
        """A group's DN, named by its DN or its address; None: the directory has no such group."""
        ...


async def check_booking_group(directory: GroupLookup, group: str, report: Report) -> None:
    """``commands.booking_group`` names a group the directory has: otherwise every organizer is refused."""
    what = f"booking group {group}"
    try:
        found = await directory.group(group)
    except GatewayError as e:
        report.error(what, e)
        return
    if found is None:
        report.line("FAIL", what, "booking_group_not_found",
                    f"the directory has no group {group}, so nobody may book through the cloud (every organizer is "
                    "refused); correct commands.booking_group (a group's DN or its address)")
    else:
        report.ok(what)


def credential_line(report: Report, expiry: CredentialExpiry, entry: str | None, now: datetime,
                    warn_days: tuple[int, ...]) -> None:
    mark, text = describe(expiry, now, warn_days)
    problem = problem_of(expiry, now)
    key = {"locked_out": "account_locked", "disabled": "account_disabled", "expired": "credential_expired"}.get(
        problem, "credential_expires_soon" if mark == "warn" else "ok" if expiry.known else "expiry_unknown")
    if mark != "ok":
        text = f"{text}; {remedy(expiry, entry, problem or 'expires')}"
    report.line(mark, f"credential {expiry.credential} ({expiry.kind})", key, text)


def _print_rooms(report: Report, results: dict[str, list[Finding]], label: str = "") -> None:
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
            report.line("FAIL", f"{label}rooms (all {len(results)})", key, text)
        else:
            names = ", ".join(members[:3]) + (f" and {len(members) - 3} more" if len(members) > 3 else "")
            report.line("FAIL", f"{label}rooms ({len(members)} of {len(results)})", key, f"{names}: {text}")
    for room, found in results.items():
        bad = [f for f in found if f.mark != "ok" and not (f.mark == "FAIL" and room in shared)]
        if not bad and room not in shared:
            report.ok(f"{label}room {room}")
        for f in bad:
            report.line(f.mark, f"{label}room {room}", f.key, f.text)
