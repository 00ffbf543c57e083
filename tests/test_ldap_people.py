"""The people sync against a real Active Directory (Samba): people created, changed, disabled and deleted in AD reach
the outbox once each, across restarts; scope (base, filter, nested group) and the privacy policy hold."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import ldap3
import pytest
from referencing import Registry, Resource

from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.model import Event
from gateway.store.sqlite import SqliteStore
from gateway.sync.people import PERSON_EVENTS, DirectoryPerson, PeopleSync, person_data
from tests.fake_gateway import cloud_event
from tests.ldap_server import (
    BASE,
    BIND_DN,
    GROUPS_OU,
    MAIL,
    PASSWORD,
    SERVER_NAME,
    SambaDC,
    group_ldif,
    person_ldif,
    room_ldif,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]
SCHEMAS = Path(__file__).parents[1] / "gateway" / "schemas"


@pytest.fixture
def ou(samba: SambaDC) -> Iterator[str]:
    """An organisational unit of the test's own: its people are the scope of the sync."""
    dn = f"OU=t{uuid.uuid4().hex[:10]},{BASE}"
    samba.add(f"dn: {dn}\nobjectClass: organizationalUnit\n")
    yield dn
    conn = samba.connect()
    try:  # the tree delete control: the OU with everything in it
        conn.delete(dn, controls=[("1.2.840.113556.1.4.805", True, None)])
    finally:
        conn.unbind()


def settings(dc: SambaDC, **kw: Any) -> LdapSettings:
    return LdapSettings(**{"urls": (dc.ldaps_url,), "bind": BIND_DN, "base_dn": BASE, "ca_file": str(dc.ca),
                           "server_name": SERVER_NAME, **kw})


@pytest.fixture
async def directory(samba: SambaDC, ou: str) -> AsyncIterator[LdapDirectory]:
    d = LdapDirectory(settings(samba, people_base=ou), PASSWORD)
    yield d
    await d.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "gateway.sqlite")
    yield s
    s.close()


def relayed(store: SqliteStore, after: int = 0) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, email, data) of each person event in the outbox after ``after``."""
    return [(e.event.type.split(".")[-2], e.event.data["email"], e.event.data) for e in store.outbox_after(after)]


def modify(dc: SambaDC, dn: str, **changes: Any) -> None:
    conn = dc.connect()
    try:
        conn.modify(dn, {k: [(ldap3.MODIFY_REPLACE, v if isinstance(v, list) else [v])] for k, v in changes.items()})
    finally:
        conn.unbind()


def delete(dc: SambaDC, dn: str) -> None:
    conn = dc.connect()
    try:
        conn.delete(dn)
    finally:
        conn.unbind()


def validator() -> jsonschema.Draft202012Validator:
    resources = [(f"https://exchange-gateway.dev/schemas/{p.relative_to(SCHEMAS).as_posix()}",
                  Resource.from_contents(json.loads(p.read_text()))) for p in SCHEMAS.rglob("*.json")]
    registry: Registry[Any] = Registry().with_resources(resources)
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / "relay" / "cloudevent.v1.json").read_text()),
                                           registry=registry)


async def test_people_created_changed_disabled_deleted_reach_the_outbox_once_each(
        samba: SambaDC, ou: str, directory: LdapDirectory, store: SqliteStore, tmp_path: Path) -> None:
    samba.add(person_ldif("pia", ou, name="Pia Park", department="Sales")
              + person_ldif("quinn", ou, name="Quinn Quade", department="Sales", manager=f"CN=Pia Park,{ou}")
              + person_ldif("rita", ou, name="Rita Ross"))
    sync = PeopleSync(directory, store, directory="corp")
    assert await sync.sync() == {"created": 3}
    created = {email: data for _, email, data in relayed(store)}
    assert sorted(created) == [f"pia@{MAIL}", f"quinn@{MAIL}", f"rita@{MAIL}"]
    assert created[f"quinn@{MAIL}"]["manager"] == f"pia@{MAIL}"  # the manager's DN becomes an address
    assert created[f"pia@{MAIL}"]["department"] == "Sales" and created[f"pia@{MAIL}"]["enabled"] is True
    assert created[f"pia@{MAIL}"]["upn"] == f"pia@{MAIL}"
    check = validator()
    for entry in store.outbox_after(0):
        check.validate(entry.event.to_cloudevent())
        assert entry.event.room == "directory:corp"

    mark = store.last_seq()
    assert await sync.sync() == {}  # nothing changed: nothing relayed
    modify(samba, f"CN=Quinn Quade,{ou}", department="Finance")
    modify(samba, f"CN=Rita Ross,{ou}", userAccountControl="514")
    assert await sync.sync() == {"updated": 1, "disabled": 1}  # incremental (uSNChanged)
    assert [(k, e) for k, e, _ in relayed(store, mark)] == [("updated", f"quinn@{MAIL}"), ("disabled", f"rita@{MAIL}")]

    mark = store.last_seq()
    delete(samba, f"CN=Pia Park,{ou}")
    assert await sync.sync() == {}  # a deletion leaves nothing an incremental search sees ...
    store.close()
    store = SqliteStore(tmp_path / "gateway.sqlite")  # ... and a restart in between changes nothing
    sync = PeopleSync(directory, store, directory="corp")
    assert await sync.sync(full=True) == {"removed": 1, "updated": 1}  # ... the full comparison finds it
    events = relayed(store, mark)
    assert [(k, e) for k, e, _ in events] == [("updated", f"quinn@{MAIL}"), ("removed", f"pia@{MAIL}")]
    assert events[0][2]["manager"] is None  # quinn's manager is gone
    assert events[1][2]["reason"] == "removed_from_directory"
    for entry in store.outbox_after(mark):
        check.validate(entry.event.to_cloudevent())
    mark = store.last_seq()
    assert await sync.sync(full=True) == {} and await sync.sync() == {}
    assert store.last_seq() == mark
    sequences = [e.room_seq for e in store.outbox_after(0)]
    assert sequences == list(range(1, len(sequences) + 1))  # one ordered stream for the directory


async def test_rooms_equipment_and_accounts_without_a_mailbox_are_not_people(
        samba: SambaDC, ou: str, directory: LdapDirectory, store: SqliteStore) -> None:
    samba.add(person_ldif("sam", ou, name="Sam Stone")
              + room_ldif("roomx", ou, name="Room X", capacity=6)
              + room_ldif("projector", ou, name="Projector", kind=32)
              + f"dn: CN=NoMail,{ou}\nobjectClass: user\nsAMAccountName: nomail{uuid.uuid4().hex[:6]}\n\n"
              + f"dn: CN=PC1,{ou}\nobjectClass: computer\nsAMAccountName: pc1{uuid.uuid4().hex[:6]}$\n"
                f"mail: pc1@{MAIL}\n")
    await PeopleSync(directory, store, directory="corp").sync()
    assert [e for _, e, _ in relayed(store)] == [f"sam@{MAIL}"]


async def test_a_group_limits_the_people_nested_membership_included(samba: SambaDC, store: SqliteStore) -> None:
    # Staff holds Sales (which holds alice) and carol; bob is in neither
    d = LdapDirectory(settings(samba, people_group=f"CN=Staff,{GROUPS_OU}"), PASSWORD)
    try:
        await PeopleSync(d, store, directory="corp").sync()
    finally:
        await d.close()
    people = {e: data for _, e, data in relayed(store)}
    assert sorted(people) == [f"alice@{MAIL}", f"carol@{MAIL}"]
    assert people[f"carol@{MAIL}"]["enabled"] is False  # a disabled person is still a person


async def test_a_filter_narrows_the_people(samba: SambaDC, ou: str, store: SqliteStore) -> None:
    samba.add(person_ldif("tia", ou, name="Tia Tell", department="Sales")
              + person_ldif("ugo", ou, name="Ugo Ude", department="Finance"))
    d = LdapDirectory(settings(samba, people_base=ou, people_filter="(department=Finance)"), PASSWORD)
    try:
        await PeopleSync(d, store, directory="corp").sync()
    finally:
        await d.close()
    assert [e for _, e, _ in relayed(store)] == [f"ugo@{MAIL}"]


async def test_dropped_fields_never_leave_and_their_changes_send_nothing(
        samba: SambaDC, ou: str, directory: LdapDirectory, store: SqliteStore) -> None:
    samba.add(person_ldif("vera", ou, name="Vera Vogt", department="Legal", telephoneNumber="+49 30 1234"))
    sync = PeopleSync(directory, store, directory="corp", drop=("department", "phone"))
    await sync.sync()
    [(_, _, data)] = relayed(store)
    assert data["department"] is None and data["phone"] is None and data["name"] == "Vera Vogt"
    assert "Legal" not in json.dumps([e.event.to_cloudevent() for e in store.outbox_after(0)])
    mark = store.last_seq()
    modify(samba, f"CN=Vera Vogt,{ou}", department="Board")
    assert await sync.sync() == {} and store.last_seq() == mark


async def test_another_domain_controller_means_a_full_comparison(
        samba: SambaDC, ou: str, directory: LdapDirectory, store: SqliteStore) -> None:
    samba.add(person_ldif("walt", ou, name="Walt Wolf"))
    sync = PeopleSync(directory, store, directory="corp")
    await sync.sync()
    state = store.people_state("directory:corp")
    assert state is not None and state.dc and state.full_at is not None
    delete(samba, f"CN=Walt Wolf,{ou}")

    class OtherDc:  # the same directory, answering from a DC with another identity (after a failover)
        async def highest_usn(self) -> tuple[int, str]:
            usn, _ = await directory.highest_usn()
            return usn, "CN=NTDS Settings,CN=DC2"

        read_people = directory.read_people

    assert await PeopleSync(OtherDc(), store, directory="corp").sync() == {"removed": 1}


async def test_person_events_pass_through_the_hub_and_make_no_room_there(vendor: Any, http: Any, hub: Any) -> None:
    key = await vendor.customer()
    link = await (await vendor.gateway()).connect(http, hub.url)
    person = person_data(DirectoryPerson(id=str(uuid.uuid4()), email=f"zoe@{MAIL}", name="Zoe Z"), directory="corp",
                         manager=None)
    event = Event(id=str(uuid.uuid4()), type=PERSON_EVENTS["created"], room="directory:corp", subject=person["id"],
                  time=datetime.now(UTC), data=person, sequence=1).to_cloudevent()
    booking = cloud_event("created", "uid-1", room_seq=1)
    assert await link.events([{"seq": 1, "room_seq": 1, "event": event},
                              {"seq": 2, "room_seq": 1, "event": booking}]) == {"type": "ack", "seq": 2}
    status, doc = await vendor.call("GET", "/v1/customers/contoso/rooms", token=key)
    assert status == 200 and [r["email"] for r in doc["rooms"]] == [booking["partitionkey"]]
    async with vendor.http.get(hub.url + "/v1/customers/contoso/events",
                               headers={"Authorization": f"Bearer {key}"}) as resp:
        data: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(data) < 2:
                line = (await resp.content.readline()).decode()
                if line.startswith("data: "):
                    data.append(json.loads(line[6:]))
    assert data[0] == event
    await link.close()


async def test_an_account_that_may_list_deleted_objects_relays_a_deletion_at_the_next_incremental_sync(
        samba: SambaDC, ou: str, store: SqliteStore) -> None:
    admin, password = samba.admin()  # AD lets administrators (or a delegated account) list Deleted Objects
    d = LdapDirectory(settings(samba, bind=admin, people_base=ou), password)
    try:
        samba.add(person_ldif("abe", ou, name="Abe Amos") + person_ldif("ada", ou, name="Ada Amos"))
        sync = PeopleSync(d, store, directory="corp")
        assert await sync.sync() == {"created": 2}
        delete(samba, f"CN=Abe Amos,{ou}")
        assert await sync.sync() == {"removed": 1}  # incremental: the tombstone tells
        assert [(k, e) for k, e, _ in relayed(store)][-1] == ("removed", f"abe@{MAIL}")
        assert await sync.sync(full=True) == {}  # and the full comparison finds nothing more
    finally:
        await d.close()


def members(dc: SambaDC, group: str, op: str, dn: str) -> None:
    conn = dc.connect()
    try:
        conn.modify(group, {"member": [(op, [dn])]})
    finally:
        conn.unbind()


async def test_leaving_the_people_group_or_a_nested_one_is_relayed_at_the_next_incremental_sync(
        samba: SambaDC, ou: str, store: SqliteStore) -> None:
    # In AD a membership change is a write to the GROUP (its member attribute): the person's uSNChanged stays.
    # Team (the configured group) holds Desk (nested) and ben; Desk holds bea and bo.
    team, desk = f"CN=Team,{ou}", f"CN=Desk,{ou}"
    samba.add(person_ldif("bea", ou, name="Bea Bell") + person_ldif("ben", ou, name="Ben Bell")
              + person_ldif("bo", ou, name="Bo Bell") + person_ldif("bix", ou, name="Bix Bell")
              + group_ldif("Desk", ou, [f"CN=Bea Bell,{ou}", f"CN=Bo Bell,{ou}"])
              + group_ldif("Team", ou, [desk, f"CN=Ben Bell,{ou}"]))
    d = LdapDirectory(settings(samba, people_group=team), PASSWORD)
    try:
        sync = PeopleSync(d, store, directory="corp")
        assert await sync.sync() == {"created": 3}
        assert await sync.sync() == {}  # nothing moved: the incremental round relays nothing

        members(samba, desk, ldap3.MODIFY_DELETE, f"CN=Bea Bell,{ou}")  # leaves the nested group
        members(samba, team, ldap3.MODIFY_DELETE, f"CN=Ben Bell,{ou}")  # leaves the configured group
        members(samba, desk, ldap3.MODIFY_ADD, f"CN=Bix Bell,{ou}")  # joins through the nested group
        mark = store.last_seq()
        assert await sync.sync() == {"created": 1, "removed": 2}  # the incremental round, not the full one
        events = relayed(store, mark)
        assert sorted((k, e) for k, e, _ in events) == [("created", f"bix@{MAIL}"), ("removed", f"bea@{MAIL}"),
                                                        ("removed", f"ben@{MAIL}")]
        assert {data.get("reason") for k, _, data in events if k == "removed"} == {"removed_from_directory"}
        assert await sync.sync() == {} and await sync.sync(full=True) == {}  # nothing left for the full comparison
    finally:
        await d.close()
