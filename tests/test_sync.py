"""SyncFolderItems against the simulator with exchangelib over HTTP + NTLM."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from exchangelib import CalendarItem as XCalendarItem
from exchangelib import EWSDateTime
from exchangelib.errors import ErrorInvalidSyncStateData, ErrorSchemaValidation
from exchangelib.properties import ItemId
from exchangelib.recurrence import DailyPattern, Recurrence
from exchangelib.services import SyncFolderItems

from gateway.simulator import ids
from gateway.simulator.calendar import CalendarItem
from tests.conftest import TZ

ROOM = "room1@contoso.com"


def add_item(ews: Any, subject: str, smtp: str = ROOM, hours: int = 1) -> str:
    """Create a calendar item directly in the simulator's store; returns its EWS ItemId."""
    def run() -> str:
        d = ews.sim.directory
        mb = d.get(smtp)
        start = datetime(2030, 1, 7, 8, tzinfo=UTC) + timedelta(hours=hours)
        item = CalendarItem(d.new_iid(), mb, mb.calendar, start=start, end=start + timedelta(minutes=30),
                            subject=subject)
        d.add_item(item)
        return ids.item_id(mb.idx, item.iid)
    return str(ews.call(run))


def _stored(ews: Any, item_id: str) -> Any:
    return ews.sim.directory.item(ids.parse_item_id(item_id)[1])


def touch(ews: Any, item_id: str, subject: str) -> None:
    def run() -> None:
        item = _stored(ews, item_id)
        item.subject = subject
        ews.sim.directory.touch(item)
    ews.call(run)


def remove(ews: Any, item_id: str) -> None:
    ews.call(lambda: ews.sim.directory.remove_item(_stored(ews, item_id)))


def sync(folder: Any, **kwargs: Any) -> list[tuple[str, Any]]:
    kwargs.setdefault("only_fields", ["subject"])
    return list(folder.sync_items(**kwargs))


def ids_of(changes: list[tuple[str, Any]], kind: str) -> list[str]:
    return [item.id for change, item in changes if change == kind]


def page(room: Any, state: str | None, size: int) -> tuple[list[tuple[str, Any]], str, bool]:
    """One SyncFolderItems call (what a gateway that checkpoints every page does)."""
    svc = SyncFolderItems(account=room)
    changes = list(svc.call(folder=room.calendar, shape="IdOnly", additional_fields=set(), sync_state=state,
                            ignore=None, max_changes_returned=size, sync_scope=None))
    return changes, svc.sync_state, bool(svc.includes_last_item_in_range)


def test_initial_sync_then_nothing_new(ews: Any) -> None:
    room = ews.room(ROOM)
    created = [add_item(ews, f"booking {i}", hours=i) for i in range(3)]
    start = EWSDateTime(2030, 1, 8, 10, tzinfo=TZ)
    via_ews = XCalendarItem(account=room, folder=room.calendar, subject="made by a client", start=start,
                            end=start + timedelta(hours=1))
    via_ews.save()
    created.append(via_ews.id)

    changes = sync(room.calendar)
    assert [c for c, _ in changes] == ["create"] * 4
    assert ids_of(changes, "create") == created[::-1]  # newest first, as Exchange 2010 SP2+ returns them
    assert {item.subject for _, item in changes} == {"booking 0", "booking 1", "booking 2", "made by a client"}
    assert all(isinstance(item, XCalendarItem) and item.changekey for _, item in changes)
    state = room.calendar.item_sync_state
    assert state
    assert sync(room.calendar) == []  # continues from item_sync_state
    assert room.calendar.item_sync_state == state


def test_paging_with_max_changes_returned(ews: Any) -> None:
    room = ews.room(ROOM)
    created = [add_item(ews, f"booking {i}", hours=i) for i in range(7)]

    # exchangelib pages internally until IncludesLastItemInRange is true.
    changes = sync(room.calendar, max_changes_returned=3)
    assert ids_of(changes, "create") == created[::-1]
    assert ews.sim.calls[("SyncFolderItems", "NoError")] == 3

    # Page by page: 3 + 3 + 1, IncludesLastItemInRange only on the last page.
    state = None
    pages = []
    while True:
        got, state, last = page(room, state, 3)
        pages.append((len(got), last))
        if last:
            break
    assert pages == [(3, False), (3, False), (1, True)]
    assert page(room, state, 3)[0] == []


def test_updates_deletes_and_what_is_left_out(ews: Any) -> None:
    room = ews.room(ROOM)
    a = add_item(ews, "A", hours=1)
    b = add_item(ews, "B", hours=2)
    untouched = add_item(ews, "untouched", hours=3)
    assert len(sync(room.calendar)) == 3
    state = room.calendar.item_sync_state

    # A client edits A and deletes B (UpdateItem / DeleteItem through exchangelib) ...
    item_a, item_b = room.fetch([ItemId(a), ItemId(b)])
    item_a.subject = "A, moved"
    item_a.save(update_fields=["subject"])
    item_b.delete()
    # ... C is created and then changed (still a Create), D is created and deleted (not reported at all).
    c = add_item(ews, "C", hours=4)
    touch(ews, c, "C, changed")
    d = add_item(ews, "D", hours=5)
    remove(ews, d)

    changes = sync(room.calendar, sync_state=state)
    assert sorted((kind, getattr(item, "id", None)) for kind, item in changes) == sorted(
        [("update", a), ("delete", b), ("create", c)])
    by_id = {getattr(item, "id", None): item for _, item in changes}
    assert by_id[a].subject == "A, moved" and by_id[c].subject == "C, changed"
    assert isinstance(by_id[b], ItemId)
    assert untouched not in by_id and d not in by_id
    assert sync(room.calendar) == []


def test_changes_made_while_paging_are_not_lost(ews: Any) -> None:
    room = ews.room(ROOM)
    created = [add_item(ews, f"booking {i}", hours=i) for i in range(5)]
    first, state, last = page(room, None, 2)
    assert [item.id for _, item in first] == created[:2:-1] and not last  # the two newest

    delivered, pending = created[4], created[0]
    touch(ews, delivered, "changed after it was sent")
    touch(ews, pending, "changed before it was sent")
    late = add_item(ews, "created while paging", hours=9)

    seen: list[tuple[str, str]] = [(kind, item.id) for kind, item in first]
    while not last:
        got, state, last = page(room, state, 2)
        seen += [(kind, item.id) for kind, item in got]
    assert sorted(seen) == sorted(("create", i) for i in created)  # the round delivers every item once
    nxt, state, last = page(room, state, 10)
    assert last
    assert sorted((kind, item.id) for kind, item in nxt) == sorted(
        [("update", delivered), ("update", pending), ("create", late)])


def test_an_occurrence_change_is_an_update_of_its_master(ews: Any) -> None:
    room = ews.room(ROOM)
    start = EWSDateTime(2030, 1, 7, 9, tzinfo=TZ)
    series = XCalendarItem(account=room, folder=room.calendar, subject="Daily", start=start,
                           end=start + timedelta(minutes=15),
                           recurrence=Recurrence(pattern=DailyPattern(interval=1), start=date(2030, 1, 7), number=5))
    series.save()
    single = add_item(ews, "single", hours=30)
    changes = sync(room.calendar, only_fields=["subject", "type"])
    assert sorted((kind, item.id) for kind, item in changes) == sorted([("create", series.id), ("create", single)])
    assert {item.id: item.type for _, item in changes}[series.id] == "RecurringMaster"

    occurrences = [o for o in room.calendar.view(start=start, end=start + timedelta(days=5)) if o.subject == "Daily"]
    assert len(occurrences) == 5
    third = occurrences[2]
    third.subject = "Daily (moved room)"
    third.save(update_fields=["subject"])

    changes = sync(room.calendar, only_fields=["subject", "type"])
    assert [(kind, item.id, item.type) for kind, item in changes] == [("update", series.id, "RecurringMaster")]
    assert changes[0][1].changekey != series.changekey


def test_ignore_list(ews: Any) -> None:
    room = ews.room(ROOM)
    mine = add_item(ews, "made by the gateway", hours=1)
    theirs = add_item(ews, "made by someone", hours=2)
    changes = sync(room.calendar, ignore=[ItemId(mine)])
    assert ids_of(changes, "create") == [theirs]
    touch(ews, mine, "edited by the gateway")
    assert sync(room.calendar, ignore=[ItemId(mine)]) == []


def test_invalid_sync_states(ews: Any) -> None:
    room = ews.room(ROOM)
    add_item(ews, "booking")
    sync(room.calendar)
    state = room.calendar.item_sync_state
    raw = bytearray(base64.b64decode(state))

    flipped = bytearray(raw)
    flipped[10] ^= 0x01
    truncated = base64.b64encode(bytes(raw[:-3])).decode()
    sync(room.trash)  # a state of another folder (Deleted Items)
    other_folder = room.trash.item_sync_state
    other = ews.room("room2@contoso.com")
    sync(other.calendar)
    other_mailbox = other.calendar.item_sync_state

    for bad in ("not a sync state", base64.b64encode(bytes(flipped)).decode(), truncated, other_folder,
                other_mailbox):
        with pytest.raises(ErrorInvalidSyncStateData):
            sync(room.calendar, sync_state=bad)
    assert ews.sim.calls[("SyncFolderItems", "ErrorInvalidSyncStateData")] == 5
    # The documented recovery: resync from scratch.
    room.calendar.item_sync_state = None
    assert [kind for kind, _ in sync(room.calendar)] == ["create"]


def test_max_changes_returned_is_1_to_512(ews: Any) -> None:
    room = ews.room(ROOM)
    add_item(ews, "booking")
    assert len(sync(room.calendar, max_changes_returned=512)) == 1
    room.calendar.item_sync_state = None
    with pytest.raises(ErrorSchemaValidation):
        sync(room.calendar, max_changes_returned=513)
