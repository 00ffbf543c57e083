"""The people sync's plan (gateway/sync/people.py), pure: whatever the directory does between syncs, the events
relayed replay to exactly what the directory holds, a person unchanged (or changed only in a dropped field) is never
relayed again, and an incremental sync never removes anyone it did not see deleted."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sync.people import DirectoryPerson, KnownPerson, content_hash, person_data, plan

pytestmark = pytest.mark.unit

IDS = [f"id-{i}" for i in range(6)]
person = st.builds(
    lambda pid, dept, enabled, phone, manager: DirectoryPerson(
        id=pid, email=f"{pid}@corp.example", name=pid.title(), department=dept, enabled=enabled, phone=phone,
        manager=f"CN={manager}" if manager else None, dn=f"CN={pid}"),
    st.sampled_from(IDS), st.sampled_from([None, "Sales", "Ops"]), st.booleans(), st.sampled_from([None, "1", "2"]),
    st.sampled_from([None, *IDS]))
directory_states = st.lists(st.lists(person, max_size=6).map(lambda ps: list({p.id: p for p in ps}.values())),
                            min_size=1, max_size=6)


def apply(known: dict[str, KnownPerson], p: Any) -> dict[str, KnownPerson]:
    known = dict(known)
    for pid in p.removes:
        known.pop(pid)
    for pid, dn, digest, data in p.upserts:
        known[pid] = KnownPerson(dn, digest, data)
    return known


@settings(max_examples=200, deadline=None)
@given(directory_states, st.sampled_from([(), ("phone",), ("department", "manager")]))
def test_full_syncs_relay_exactly_the_differences(states: list[list[DirectoryPerson]], drop: tuple[str, ...]) -> None:
    known: dict[str, KnownPerson] = {}
    consumer: dict[str, dict[str, Any]] = {}  # what a consumer holds after applying every event
    for observed in states:
        p = plan(known, observed, full=True, directory="corp", drop=drop)
        for kind, pid, data in p.changes:
            if kind == "removed":
                assert pid in consumer and data["reason"] == "removed_from_directory"
                del consumer[pid]
            else:
                assert (kind == "created") == (pid not in consumer)
                if kind == "disabled":
                    assert consumer[pid]["enabled"] and not data["enabled"]
                consumer[pid] = data
        known = apply(known, p)
        addresses = {o.dn: o.email for o in observed}
        assert consumer == {o.id: person_data(o, directory="corp", manager=addresses.get(o.manager or ""), drop=drop)
                            for o in observed}
        assert all(all(data[f] is None for f in drop) for data in consumer.values())
        again = plan(known, observed, full=True, directory="corp", drop=drop)
        assert again.changes == []  # nothing changed: nothing relayed


@given(st.lists(person, max_size=6), st.lists(st.sampled_from(IDS), max_size=3))
def test_an_incremental_sync_removes_only_whom_it_saw_deleted(people: list[DirectoryPerson],
                                                              deleted: list[str]) -> None:
    people = list({p.id: p for p in people}.values())
    known = {p.id: KnownPerson(p.dn, content_hash(d := person_data(p, directory="corp", manager=None)), d)
             for p in people}
    p = plan(known, [], full=False, directory="corp", deleted=deleted)
    assert sorted(p.removes) == sorted(set(deleted) & set(known))
    assert [k for k, _, _ in p.changes] == ["removed"] * len(p.removes)
