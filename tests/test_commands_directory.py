"""The organizer of a cloud booking, looked up in the organisation's directory (a real Active Directory: Samba) before
the booking is written into Exchange (the EWS simulator, over HTTP + NTLM): an enabled user gets a meeting in their
calendar; a disabled or unknown one is booked as an external booker or refused, as ``commands:`` says; a booking
group (nested membership) limits who may book."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest
import yaml

from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.commands import CommandService
from gateway.commands.organizers import OrganizerCheck
from gateway.config import CommandsConfig
from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.directory_service import DirectoryOptions
from gateway.model import Command, CommandResult, Room, Window
from gateway.ports import SourceSpec
from gateway.relay.protocol import parse_command
from gateway.simulator.control import Control
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.writer import EwsWriter
from gateway.sources.memory import MemorySource
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore
from gateway.sync.people import PeopleSync
from tests.gateway_cli import gateway
from tests.ldap_server import BASE, BIND_DN, PASSWORD, SERVER_NAME, SambaDC, group_ldif, user_ldif

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]

ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
T0 = (datetime.now(UTC) + timedelta(days=3)).replace(hour=8, minute=0, second=0, microsecond=0)
WINDOW = Window(T0 - timedelta(days=1), T0 + timedelta(days=7))
_keys = itertools.count(1)
# The simulator's people (gateway.simulator.seed.standard_org), given accounts in AD with the same addresses.
ALICE, BOB, CAROL, DAVE = "alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "dave@contoso.com"
NOBODY = "erin@contoso.com"  # has a mailbox in Exchange, no account in the directory


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def command(**fields: Any) -> Command:
    return parse_command({"key": f"org-{uuid.uuid4().hex[:6]}-{next(_keys)}", "type": "create", "room": ROOM1,
                          "start": iso(at(0)), "end": iso(at(1)), **fields})


def organizer(email: str, **kw: Any) -> dict[str, Any]:
    return {"organizer": {"email": email, "name": email.split("@")[0].title()}, "subject": "Planning", **kw}


@dataclass
class Gateway:
    """The command service over the real EwsWriter; its resync reads the room's window back into the store."""

    ews: Any
    source: EwsSource
    store: SqliteStore
    service: CommandService

    async def resync(self, room: str) -> None:
        bookings = await self.source.read_window(room, WINDOW)
        gone = set(self.store.known(room)) - {b.id for b in bookings}
        await asyncio.to_thread(self.store.commit_sync, room, upserts=bookings, deletes=sorted(gone), events=())

    def meeting(self, uid: str | None) -> dict[str, Any]:
        assert uid is not None
        return self.ews.call(lambda: Control.of(self.ews.sim).meeting_state(uid))  # type: ignore[no-any-return]

    def room_response(self, uid: str | None) -> str | None:
        copies = [c for c in self.meeting(uid)["copies"] if c["mailbox"] == ROOM1 and c["present"]]
        return copies[0]["response"] if copies else None

    def in_room(self) -> list[Any]:
        return [b for b in self.store.bookings(ROOM1) if not b.cancelled]


@pytest.fixture
def org(samba: SambaDC) -> Iterator[str]:
    """An OU of its own: Alice (in Planners through Bookers, nested), Bob (enabled, in no group), Carol (disabled)
    and Dave (disabled, in Bookers); removed afterwards, so other tests' directories keep their people."""
    tag = uuid.uuid4().hex[:8]
    ou = f"OU=o{tag},{BASE}"
    samba.add(f"dn: {ou}\nobjectClass: organizationalUnit\n")
    people = [("Alice", ALICE, 512), ("Bob", BOB, 512), ("Carol", CAROL, 514), ("Dave", DAVE, 514)]
    samba.add("".join(user_ldif(f"{name} {tag}", ou, sam=f"{name.lower()}-{tag}", mail=mail, uac=uac,
                                msExchRecipientTypeDetails=1) for name, mail, uac in people))
    samba.add(group_ldif(f"Planners {tag}", ou, [f"CN=Alice {tag},{ou}"])
              + group_ldif(f"Bookers {tag}", ou, [f"CN=Planners {tag},{ou}", f"CN=Dave {tag},{ou}"],
                           mail=f"bookers-{tag}@contoso.com"))
    yield ou
    conn = samba.connect()
    try:
        conn.delete(ou, controls=[("1.2.840.113556.1.4.805", True, None)])  # the tree delete control
    finally:
        conn.unbind()


def bookers(ou: str) -> str:
    return f"CN=Bookers {ou.split(',')[0][4:]},{ou}"


@pytest.fixture
async def directory(samba: SambaDC, org: str) -> AsyncIterator[LdapDirectory]:
    d = LdapDirectory(LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                                   server_name=SERVER_NAME, people_base=org), PASSWORD)
    yield d
    await d.close()


@pytest.fixture
async def make(ews: Any, tmp_path: Path, directory: LdapDirectory) -> AsyncIterator[Any]:
    opened: list[Gateway] = []

    async def start(people: bool = False, **settings: Any) -> Gateway:
        source = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{ORGANIZER_ACCOUNT}",
                                       default_timezone="Europe/Berlin", max_workers=6), SERVICE_PASSWORD)
        store = SqliteStore(tmp_path / f"gateway{len(opened)}.sqlite")
        for room in (ROOM1, ROOM2):
            store.upsert_room(Room(room))
        journal = CommandJournal(store)
        commands = CommandsConfig(**{"attendant_timeout_seconds": 15.0, **settings})
        check = OrganizerCheck(directory, commands)
        if people:  # the people sync's snapshot in the store, as the running gateway keeps it
            await PeopleSync(directory, store, directory="corp", source="test").sync()
            check = OrganizerCheck(directory, commands, people=lambda: store.people("directory:corp"),
                                   people_state=lambda: store.people_state("directory:corp"))
        holder: dict[str, Gateway] = {}

        async def resync(room: str, uids: frozenset[str] = frozenset()) -> None:
            await holder["g"].resync(room)

        service = CommandService(EwsWriter(source), store, journal, commands, rooms=lambda: (ROOM1, ROOM2),
                                 resync=resync, organizers=check)
        g = holder["g"] = Gateway(ews, source, store, service)
        opened.append(g)
        return g

    yield start
    for g in opened:
        await g.source.close()
        g.store.close()


def accepted_ok(result: CommandResult) -> CommandResult:
    assert result.status == "accepted", result
    assert result.uid and result.booking_id
    return result


def refused(result: CommandResult, *words: str) -> None:
    assert (result.status, result.reason) == ("declined", "organizer_not_permitted"), result
    for word in words:
        assert word in result.message, result.message


def as_external(g: Gateway, result: CommandResult) -> None:
    """Booked in the room's calendar with the organizer as booker: no meeting in anyone's calendar."""
    accepted_ok(result)
    assert g.meeting(result.uid).get("appointment_in") == ROOM1
    assert "organizer as booker" in result.message


async def test_an_enabled_user_gets_a_meeting_in_their_calendar(make):
    g = await make()
    result = accepted_ok(await g.service.execute(command(**organizer(BOB))))
    assert g.meeting(result.uid)["organizer"]["email"] == BOB
    assert g.room_response(result.uid) == "Accept"


async def test_a_disabled_user_is_refused_by_default_and_booked_as_external_if_policy_says(make):
    g = await make()
    refused(await g.service.execute(command(**organizer(CAROL))), CAROL, "disabled", "commands.disabled_organizer")
    assert g.in_room() == []  # nothing was written
    g = await make(disabled_organizer="external")
    as_external(g, await g.service.execute(command(**organizer(CAROL))))


async def test_an_unknown_address_is_external_by_default_and_refused_if_policy_says(make):
    g = await make()
    as_external(g, await g.service.execute(command(**organizer(NOBODY))))
    g = await make(unknown_organizer="refuse")
    refused(await g.service.execute(command(**organizer(NOBODY, start=iso(at(2)), end=iso(at(3))))),
            NOBODY, "commands.unknown_organizer")


async def test_a_booking_group_admits_nested_members_and_refuses_the_rest(make, org):
    group = bookers(org)
    g = await make(booking_group=group)
    result = accepted_ok(await g.service.execute(command(**organizer(ALICE))))  # Alice: Planners, in Bookers
    assert g.meeting(result.uid)["organizer"]["email"] == ALICE
    later = {"start": iso(at(2)), "end": iso(at(3))}
    refused(await g.service.execute(command(**organizer(BOB, **later))), BOB, group, "commands.booking_group")
    refused(await g.service.execute(command(**organizer(NOBODY, **later))), NOBODY, "commands.booking_group")
    refused(await g.service.execute(command(**organizer(DAVE, **later))), "disabled")  # a member, but disabled


async def test_a_booking_group_may_be_named_by_its_address(make, org):
    tag = org.split(",")[0][4:]
    g = await make(booking_group=f"bookers-{tag}@contoso.com")
    accepted_ok(await g.service.execute(command(**organizer(ALICE))))
    refused(await g.service.execute(command(**organizer(BOB, start=iso(at(2)), end=iso(at(3))))), BOB)


async def test_a_booking_group_the_directory_does_not_have_refuses_with_the_setting_to_correct(make):
    g = await make(booking_group="no-such-group@contoso.com")
    refused(await g.service.execute(command(**organizer(ALICE))), "no-such-group@contoso.com",
            "not in the organisation's directory", "correct commands.booking_group")


async def test_the_people_snapshot_answers_without_asking_the_directory(make, directory):
    g = await make(people=True)
    before = directory.requests
    refused(await g.service.execute(command(**organizer(CAROL))), "disabled")
    accepted_ok(await g.service.execute(command(**organizer(BOB))))
    assert directory.requests == before  # both answered from the store
    as_external(g, await g.service.execute(command(**organizer(NOBODY, start=iso(at(2)), end=iso(at(3))))))
    assert directory.requests > before  # someone the snapshot lacks is asked of the directory


async def test_a_user_disabled_in_the_directory_is_refused_after_the_next_people_sync(make, directory, samba, org):
    g = await make(people=True)
    accepted_ok(await g.service.execute(command(**organizer(BOB))))
    conn = samba.connect()
    try:
        assert conn.modify(f"CN=Bob {org.split(',')[0][4:]},{org}",
                           {"userAccountControl": [(ldap3.MODIFY_REPLACE, [514])]}), conn.result
    finally:
        conn.unbind()
    await PeopleSync(directory, g.store, directory="corp", source="test").sync()
    refused(await g.service.execute(command(**organizer(BOB, start=iso(at(2)), end=iso(at(3))))), BOB, "disabled")


def set_enabled(samba: SambaDC, org: str, name: str, enabled: bool) -> None:
    conn = samba.connect()
    try:
        assert conn.modify(f"CN={name} {org.split(',')[0][4:]},{org}",
                           {"userAccountControl": [(ldap3.MODIFY_REPLACE, [512 if enabled else 514])]}), conn.result
    finally:
        conn.unbind()


async def test_an_organizer_disabled_since_the_booking_cannot_move_it_but_may_cancel_it(make, samba, org):
    g = await make()
    made = accepted_ok(await g.service.execute(command(**organizer(BOB))))
    set_enabled(samba, org, "Bob", False)
    try:
        moved = await g.service.execute(command(type="update", booking_id=made.booking_id, start=iso(at(2)),
                                                end=iso(at(3))))
        refused(moved, BOB, "disabled")
        assert g.meeting(made.uid)["start"].startswith(iso(at(0))[:16])  # the meeting keeps its time
        # Cancelling only frees the room: a leaver's meeting must not hold it (policy: cancel is never refused).
        cancelled = await g.service.execute(parse_command({"key": f"org-{uuid.uuid4().hex[:8]}", "type": "cancel",
                                                           "room": ROOM1, "booking_id": made.booking_id}))
        assert cancelled.status == "accepted", cancelled
    finally:
        set_enabled(samba, org, "Bob", True)


async def test_an_organizer_who_left_the_booking_group_cannot_move_a_booking(make, samba, org):
    tag = org.split(",")[0][4:]
    g = await make(booking_group=bookers(org))
    made = accepted_ok(await g.service.execute(command(**organizer(ALICE))))  # Alice: Planners, in Bookers
    accepted_ok(await g.service.execute(command(type="update", booking_id=made.booking_id, start=iso(at(1)),
                                                end=iso(at(2)))))  # a member moves her meeting
    conn = samba.connect()
    try:
        assert conn.modify(f"CN=Planners {tag},{org}", {"member": [(ldap3.MODIFY_DELETE, [f"CN=Alice {tag},{org}"])]})
    finally:
        conn.unbind()
    moved = await g.service.execute(command(type="update", booking_id=made.booking_id, start=iso(at(3)),
                                            end=iso(at(4))))
    refused(moved, ALICE, "commands.booking_group")
    assert g.meeting(made.uid)["start"].startswith(iso(at(1))[:16])


async def test_the_running_gateway_asks_its_directory_about_organizers(tmp_path, samba, org):
    exchange = MemorySource()
    exchange.add_room(ROOM1, "Room 1")
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME, people_base=org)
    options = GatewayOptions(sources=(SourceSpec("onprem", "memory", exchange, rooms=(ROOM1,)),),
                             store_path=tmp_path / "gateway.sqlite", feed="poll",
                             commands=CommandsConfig(unknown_organizer="refuse"),
                             directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600))
    gw = await start_gateway(options)
    try:
        refused(await gw.commands.execute(command(**organizer(CAROL))), CAROL, "disabled")
        refused(await gw.commands.execute(command(**organizer(NOBODY))), NOBODY, "commands.unknown_organizer")
    finally:
        await stop_gateway(gw)


def test_doctor_checks_that_the_booking_group_is_in_the_directory(tmp_path: Path, samba: SambaDC, ews: Any,
                                                                   org: str) -> None:
    tag = org.split(",")[0][4:]

    def doctor(group: str) -> tuple[int, str]:
        """doctor's exit code and its line about the booking group."""
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml.safe_dump({
            "exchange": {"ews_url": ews.url, "allow_insecure_http": True, "username": f"CONTOSO\\{ORGANIZER_ACCOUNT}",
                         "password_ref": "vault:exchange"},
            "rooms": {"mailboxes": [ROOM1]},
            "store": {"path": str(tmp_path / "data" / "gateway.sqlite")},
            "vault": {"path": str(tmp_path / "data" / "credentials.vault"), "key_file": str(tmp_path / "vault.key")},
            "commands": {"enabled": True, "writable_rooms": ["*"], "booking_group": group},
            "directory": {"name": "corp", "urls": [samba.ldaps_url], "bind": BIND_DN, "password_ref": "vault:ldap",
                          "ca_bundle": str(samba.ca), "server_name": SERVER_NAME, "base_dn": BASE}}))
        if not (tmp_path / "data" / "credentials.vault").exists():
            for name, secret in (("exchange", SERVICE_PASSWORD), ("ldap", PASSWORD)):
                assert gateway("credentials", "set", name, "--stdin", "--config", str(cfg),
                               stdin=secret).returncode == 0
        done = gateway("doctor", "--config", str(cfg))
        found = [line for line in done.stdout.splitlines() if f"booking group {group} " in line]
        assert len(found) == 1, done.stdout + done.stderr
        return done.returncode, found[0]

    for group in (f"bookers-{tag}@contoso.com", bookers(org)):  # by address, by DN
        code, line = doctor(group)
        assert line.startswith("ok"), line
    for group in ("no-such-group@contoso.com", f"CN=Nobody {tag},{org}"):
        code, line = doctor(group)
        assert code == 1 and line.startswith("FAIL") and "booking_group_not_found" in line, line
        assert "commands.booking_group" in line and "nobody" in line  # what it means and the setting to correct
