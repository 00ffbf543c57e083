"""End to end, room by room: what the gateway does when rooms are misconfigured, credentials are wrong,
notifications are missed, time passes, feeds differ, rooms leave the configuration, or a read comes back empty.

Every test runs the whole gateway (init_app, EWS over HTTP + NTLM to the simulator, SQLite on disk) and looks at
what a consumer or an operator sees: GET /v1/rooms, /metrics, the outbox events and the logs.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from requests_ntlm import HttpNtlmAuth
from structlog.testing import capture_logs

from gateway import service
from gateway.model import ROOM_STATES, Booking, Window
from gateway.simulator.calendar import Recurrence
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.streaming import PullFeed
from gateway.store.sqlite import SqliteStore
from tests.conftest import SimFixture, eventually
from tests.running_gateway import (
    CREATED,
    DELETED,
    ROOM1,
    ROOM2,
    ROOM_STATE,
    UPDATED,
    appointment,
    appointment_on_loop,
    soon,
    start,
)

NOT_A_ROOM = "alice@contoso.com"  # a person: the rooms-scoped service account may not impersonate her
NO_MAILBOX = "nobody@contoso.com"


@pytest.fixture
def ews(sim_factory: Any) -> SimFixture:
    return sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5, pull_minute=2.0))


# -- 1. misconfigured rooms ---------------------------------------------------------------------------------------
async def test_misconfigured_rooms_get_stable_states_and_never_stall_the_good_ones(ews, tmp_path, aiohttp_client):
    g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2, NOT_A_ROOM, NO_MAILBOX))
    expected = {ROOM1: "verified", ROOM2: "verified", NOT_A_ROOM: "impersonation_denied",
                NO_MAILBOX: "mailbox_not_found"}
    # The announced state (the room.state_changed event) is committed after the worker's own field changes.
    await eventually(lambda: all(g.states(r)[-1:] == [s] for r, s in expected.items()), what="every room's state")
    await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions >= 2,  # type: ignore[union-attr]
                     what="the good rooms subscribed")

    rooms = await g.rooms()
    assert {r: rooms[r]["state"] for r in expected} == expected
    for r in (NOT_A_ROOM, NO_MAILBOX):
        assert rooms[r]["remedy"] == ROOM_STATES[expected[r]]
        assert r in rooms[r]["reason"]  # says which address is wrong
    assert "ApplicationImpersonation" in rooms[NOT_A_ROOM]["remedy"]
    assert "address" in rooms[NO_MAILBOX]["remedy"]
    for state, count in (("verified", 2), ("impersonation_denied", 1), ("mailbox_not_found", 1)):
        assert await g.metric("gateway_rooms", state=state) == count, state
    bad = g.events(NOT_A_ROOM, ROOM_STATE)[-1].data
    assert bad == {"room": NOT_A_ROOM, "state": "impersonation_denied", "reason": rooms[NOT_A_ROOM]["reason"],
                   "remedy": ROOM_STATES["impersonation_denied"]}

    # The broken rooms keep being retried, but a room's state is announced once, not on every retry.
    uid = appointment(ews, ROOM1, "Good room still syncs", soon())
    created = await eventually(lambda: g.events(ROOM1, CREATED), what="a change in a good room")
    assert created[0].data["uid"] == uid and created[0].data["subject"] == "Good room still syncs"
    assert g.states(NO_MAILBOX) == ["mailbox_not_found"] and g.states(NOT_A_ROOM) == ["impersonation_denied"]

    # The admin creates the missing mailbox: the room is picked up, and its changes arrive by notification too.
    ews.call(lambda: ews.sim.directory.add_mailbox(NO_MAILBOX, "Annex Room 9", "room", capacity=6))
    await eventually(lambda: g.imported(NO_MAILBOX), what="the new room imported")
    uid = appointment(ews, NO_MAILBOX, "First booking in the new room", soon(30))
    created = await eventually(lambda: g.events(NO_MAILBOX, CREATED), what="a change in the repaired room")
    assert created[0].data["uid"] == uid
    assert (await g.rooms())[NO_MAILBOX]["state"] == "verified"
    assert g.state(NOT_A_ROOM) == "impersonation_denied"


# -- 2. wrong password --------------------------------------------------------------------------------------------
def failed_logons(ews: SimFixture) -> int:
    """Failed logons the simulated Exchange saw: each one counts towards the account's lockout threshold in AD."""
    return int(ews.call(lambda: ews.sim.failed_logons))


def lockout(ews: SimFixture) -> dict[str, Any]:
    """The service account's lockout state in the simulated Active Directory (gateway/simulator/lockout.py)."""
    return dict(ews.call(lambda: ews.sim.lockouts.state())["accounts"].get(f"{SERVICE_ACCOUNT}@contoso.com", {}))


def fail_logons(ews: SimFixture, count: int) -> None:
    """Someone else tries the service account with a wrong password (a forgotten script, an old phone)."""
    for _ in range(count):
        with requests.Session() as s:
            answer = s.post(ews.url, data=b"<x/>", headers={"Content-Type": "text/xml"},
                            auth=HttpNtlmAuth(f"CONTOSO\\{SERVICE_ACCOUNT}", "Wrong-password-9!"), timeout=20)
        assert answer.status_code == 401


async def test_a_lockout_exchange_reports_stops_every_room_without_a_logon_each_and_is_told_without_a_directory(
        sim_factory, tmp_path, aiohttp_client):
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5), rooms=12)
    rooms = tuple(f"room{i}@contoso.com" for i in range(1, 13))
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", rooms, retry_seconds=0.05,
                        auth_retry_seconds=0.2, feed_retry=0.05, ews_settings={"auth_retry_seconds": 3600.0})
        await eventually(lambda: g.imported(*rooms), what="imported")
        ews.call(lambda: ews.sim.lockouts.set_policy(3, 30, 30))
        fail_logons(ews, 3)
        assert lockout(ews)["locked"] is True
        ews.call(ews.sim.restart)  # the gateway's authenticated connections are gone: the next call logs on anew
        for r in rooms:
            g.gw.coordinator.mark_dirty(r, "test")
        await eventually(lambda: all(g.state(r) == "account_locked" for r in rooms), what="account_locked")
        gate = g.gw.sources["exchange"].opened.outage
        assert gate is not None and gate.failure is not None and gate.failure.key == "account_locked"
        watch = g.gw.credentials
        assert watch is not None
        await eventually(lambda: any(e.locked_out for e in watch.current), what="the lockout told (no directory)")
        assert await g.metric("gateway_credential_locked_out", credential="source:exchange") == 1
        assert failed_logons(ews) == 3  # the gateway added no bad password

        ews.call(lambda: ews.sim.lockouts.unlock(f"{SERVICE_ACCOUNT}@contoso.com"))  # an administrator unlocks it
        gate.release()  # what the directory's word does (test_credential_ad.py): one probe now, not in an hour
        await eventually(lambda: all(g.state(r) == "verified" for r in rooms), what="recovered")
        # While it was locked: only the calls already out when Exchange first said so (the source's threads and the
        # feed's), not one a room, and no retry (the gate held them, the rooms waited for its end).
        assert 1 <= lockout(ews)["logons_while_locked"] < len(rooms), lockout(ews)
        await watch.check()
        assert not any(e.locked_out for e in watch.current)
        assert await g.metric("gateway_credential_locked_out", credential="source:exchange") == 0
    assert failed_logons(ews) == 3
    locked = [e for e in logs if e["event"] == "credential.locked_out"]
    assert len(locked) == 1 and "Unlock-ADAccount" in locked[0]["remedy"]


async def test_wrong_password_costs_one_failed_logon_stops_every_room_and_takes_the_fixed_password_at_once(
        sim_factory, tmp_path, aiohttp_client):
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5), rooms=8)
    ews.call(lambda: ews.sim.lockouts.set_policy(3, 30, 30))  # AD locks the account after 3 bad passwords
    rooms = tuple(f"room{i}@contoso.com" for i in range(1, 9))
    vault = {"password": "Not-the-password-1!"}  # what `gateway credentials set exchange` last stored
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", rooms, password=vault["password"],
                        retry_seconds=0.05, auth_retry_seconds=0.2, feed_retry=0.05,
                        ews_settings={"auth_retry_seconds": 3600.0},
                        options={"password_source": lambda: vault["password"], "password_check_seconds": 0.1})
        await eventually(lambda: all(g.state(r) == "auth_required" for r in rooms), what="auth_required")
        # The feed has tried too (and been held back), the rooms have retried many times: still one logon.
        await eventually(lambda: [e for e in logs if e["event"] == "streaming.rooms_without_subscription"],
                         what="the feed's attempt")
        await eventually(lambda: sum(1 for e in logs if e["event"] == "room.state") >= len(rooms),
                         what="every room's state logged")
        assert failed_logons(ews) == 1
        assert lockout(ews) == {"locked": False, "bad_password_count": 1, "logons_while_locked": 0}  # 8 rooms
        rows = await g.rooms()
        assert all(rows[r]["state"] == "auth_required" for r in rooms)
        assert all(rows[r]["remedy"] == ROOM_STATES["auth_required"] for r in rooms)
        assert "gateway credentials set exchange" in rows[ROOM1]["remedy"]
        assert "refused the service account's credentials" in rows[ROOM1]["reason"]
        assert await g.metric("gateway_rooms", state="auth_required") == len(rooms)
        assert await g.metric("gateway_rooms", state="verified") == 0  # exported as 0, not left out
        ready = await g.client.get("/readyz")
        assert ready.status == 503
        assert any(r.startswith(f"no room is in sync ({len(rooms)} auth_required)")
                   for r in (await ready.json())["reasons"])
        assert all(g.states(r) == ["auth_required"] for r in rooms)

        # The right password is stored in the vault: the gateway reads it again and tries it now, not after the
        # hour-long back-off that keeps a wrong one from locking the account.
        vault["password"] = SERVICE_PASSWORD
        await eventually(lambda: all(g.states(r)[-2:] == ["syncing", "verified"] or g.states(r)[-1] == "verified"
                                     for r in rooms), what="recovered")
        await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions == len(rooms),
                         what="every room subscribed")
    assert failed_logons(ews) == 1
    started = [e for e in logs if e["event"] == "exchange.auth_failed"]
    assert len(started) == 1 and started[0]["key"] == "invalid_auth" and started[0]["log_level"] == "error"
    assert "gateway credentials set exchange" in started[0]["remedy"]
    assert len([e for e in logs if e["event"] == "exchange.auth_restored"]) == 1
    assert not [e for e in logs if e["event"] == "exchange.outage_started"]
    assert len([e for e in logs if e["event"] == "exchange.credentials_changed"]) == 1
    for r in rooms:  # the outage is the warning; each room's own line is info
        transitions = [e for e in logs if e["event"] == "room.state" and e["room"] == r]
        assert [e["state"] for e in transitions].count("auth_required") == 1, (r, transitions)
        assert all(e["log_level"] == "info" for e in transitions), transitions
    assert len([e for e in logs if e["event"] == "streaming.rooms_without_subscription"]) <= 1


async def test_room_lists_that_cannot_be_read_at_start_do_not_stop_the_gateway_or_cost_more_logons(
        ews, tmp_path, aiohttp_client):
    """A wrong password (or Exchange away) while the room lists are read at start: the gateway starts anyway, with
    the rooms it knew, says why it is not ready, and reads the lists when the password works: a gateway that exited
    would be restarted by its supervisor, and every restart would be another failed logon."""
    store = tmp_path / "g.sqlite"
    lists = tuple(ews.org.room_lists)
    members = sorted(ews.org.rooms)
    vault = {"password": "Not-the-password-1!"}
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, store, (), password=vault["password"],
                        ews_settings={"auth_retry_seconds": 3600.0},
                        options={"password_source": lambda: vault["password"], "password_check_seconds": 0.1,
                                 "room_lists": lists})
        await eventually(lambda: [e for e in logs if e["event"] == "gateway.room_lists_unreadable"],
                         what="the lists reported")
        ready = await g.client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["reasons"] == [
            "source exchange: its room lists could not be read yet (invalid_auth), so it has no rooms"]
        assert failed_logons(ews) == 1
        vault["password"] = SERVICE_PASSWORD
        await eventually(lambda: set(g.gw.coordinator.workers) == set(members), what="the lists' rooms")
        await eventually(lambda: g.imported(*members), what="imported")
        await eventually(lambda: g.gw.feed is not None and g.gw.feed.subscriptions == len(members),
                         what="the lists' rooms subscribed")
    assert failed_logons(ews) == 1
    assert (await g.client.get("/readyz")).status == 200


# -- 3. reconciliation ---------------------------------------------------------------------------------------------
async def test_reconciliation_repairs_and_counts_what_notifications_missed(ews, tmp_path, aiohttp_client):
    with capture_logs() as logs:
        g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2), reconcile_seconds=1.0)
        await eventually(lambda: g.imported(ROOM1, ROOM2), what="imported")
        await g.settled()
        assert await g.metric("gateway_sync_reconcile_drift_total", room=ROOM1) == 0
        # Both at once (one step on the simulator's loop), so one reconciliation finds both.
        hidden = set(ews.call(lambda: [appointment_on_loop(ews, ROOM1, f"Missed {i}", soon(28 + i), notify=False)
                                       for i in range(2)]))
        created = await eventually(lambda: len(g.events(ROOM1, CREATED)) == 2 and g.events(ROOM1, CREATED),
                                   what="the missed bookings")
        assert {e.data["uid"] for e in created} == hidden
        drift = "gateway_sync_reconcile_drift_total"
        await eventually(lambda: g.metric(drift, room=ROOM1), what="the drift counted")
        assert await g.metric(drift, room=ROOM1) == 2
        assert await g.metric(drift, room=ROOM2) == 0
        resp = await g.client.get(f"/v1/rooms/{ROOM1}/bookings", params={"end": _iso(soon(40))})
        assert {b["uid"] for b in (await resp.json())["bookings"]} == hidden
        # Repaired once: the next reconciliation finds nothing more to do.
        worker = g.gw.coordinator.workers[ROOM1]
        repaired_at = worker.last_success or 0.0
        await eventually(lambda: (worker.last_success or 0.0) > repaired_at, what="a later reconciliation")
        assert await g.metric(drift, room=ROOM1) == 2 and len(g.events(ROOM1, CREATED)) == 2
    repaired = [e for e in logs if e["event"] == "sync.drift_repaired"]
    assert len(repaired) == 1 and repaired[0]["room"] == ROOM1 and repaired[0]["created"] == 2


# -- 4. the window rolls forward ------------------------------------------------------------------------------------
async def test_window_rolls_forward_and_a_weekly_series_produces_its_next_occurrence(ews, tmp_path, aiohttp_client):
    offset = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + offset[0]
    g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1,), clock=clock, days_back=1, days_ahead=2,
                    roll_seconds=0.2, reconcile_seconds=3600.0)
    await eventually(lambda: g.imported(ROOM1), what="imported")
    first = soon(24)
    rec = Recurrence(kind="Weekly", days_of_week=(first.strftime("%A"),), start_date=first.date(), count=4)
    uid = appointment(ews, ROOM1, "Weekly planning", first, recurrence=rec)
    created = await eventually(lambda: g.events(ROOM1, CREATED), what="the first occurrence")
    await g.settled()
    assert [e.data["original_start"] for e in g.events(ROOM1, CREATED)] == [_iso(first)]
    assert created[0].data["uid"] == uid

    offset[0] = timedelta(days=7)  # a week later the second occurrence has entered the two-day window
    await eventually(lambda: len(g.events(ROOM1, CREATED)) == 2, what="the next occurrence")
    await g.settled()
    worker = g.gw.coordinator.workers[ROOM1]
    rolled = worker.horizon
    await eventually(lambda: worker.horizon > rolled, what="another roll after the one that found it")
    occurrences = [e.data["original_start"] for e in g.events(ROOM1, CREATED)]
    assert occurrences == [_iso(first), _iso(first + timedelta(days=7))]
    assert g.events(ROOM1, DELETED) == [] and g.events(ROOM1, UPDATED) == []
    assert await g.metric("gateway_sync_reconcile_drift_total", room=ROOM1) == 0  # no reconciliation did it


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- 5. pull and poll -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feed", ["pull", "poll"])
async def test_pull_and_poll_modes_deliver_changes(feed, ews, tmp_path, aiohttp_client):
    g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1, ROOM2), feed=feed, pull_interval=0.3,
                    poll_seconds=0.3 if feed == "poll" else 0.0, reconcile_seconds=3600.0)
    assert isinstance(g.gw.feed, PullFeed) if feed == "pull" else g.gw.feed is None
    await eventually(lambda: g.imported(ROOM1, ROOM2), what="imported")
    await g.settled()
    uid = appointment(ews, ROOM2, f"By {feed}", soon())
    created = await eventually(lambda: g.events(ROOM2, CREATED), what=f"created via {feed}")
    assert created[0].data["uid"] == uid

    def cancel() -> None:
        mb = ews.sim.directory.get(ROOM2)
        item = next(i for i in mb.calendar.items.values() if i.uid == uid)
        ews.sim.directory.remove_item(item)
    ews.call(cancel)
    deleted = await eventually(lambda: g.events(ROOM2, DELETED), what=f"deleted via {feed}")
    assert deleted[0].data["id"] == created[0].data["id"]
    assert deleted[0].data["reason"] == "removed_from_exchange"
    assert g.events(ROOM1, CREATED) == []
    assert await g.metric("gateway_sync_reconcile_drift_total", room=ROOM2) == 0


# -- 6. a room leaves the configuration ----------------------------------------------------------------------------
async def test_a_room_that_leaves_the_configuration_is_released_and_forgetting_it_withdraws_its_bookings(
        ews, tmp_path, aiohttp_client):
    store = tmp_path / "g.sqlite"
    kept = appointment(ews, ROOM1, "Stays", soon())
    gone = {appointment(ews, ROOM2, f"Leaves {i}", soon(26 + 2 * i)) for i in range(2)}
    first = await start(aiohttp_client, ews, store, (ROOM1, ROOM2))
    await eventually(lambda: len(first.events(type_=CREATED)) == 3, what="the initial import")
    ids = {e.data["id"] for e in first.events(ROOM2, CREATED)}
    assert {e.data["uid"] for e in first.events(ROOM2, CREATED)} == gone
    await eventually(lambda: first.imported(ROOM1, ROOM2), what="both imports announced")  # bookings come first
    announced = first.states(ROOM2)
    await first.client.close()

    # Taken out of the configuration: released, as a room handed over to another gateway is. Nothing is deleted.
    second = await start(aiohttp_client, ews, store, (ROOM1,))
    await eventually(lambda: second.gw.coordinator.workers[ROOM1].last_success, what="ROOM1 synced after the restart")
    assert second.events(ROOM2, DELETED) == [] and second.events(ROOM1, DELETED) == []
    assert second.states(ROOM2) == announced  # no room event either
    assert ROOM2 not in await second.rooms() and second.gw.store.bookings(ROOM2) == []
    resp = await second.client.get(f"/v1/rooms/{ROOM2}/bookings")
    assert resp.status == 404 and (await resp.json())["error"] == "room_unknown"
    resp = await second.client.get(f"/v1/rooms/{ROOM1}/bookings", params={"end": _iso(soon(48))})
    assert [b["uid"] for b in (await resp.json())["bookings"]] == [kept]
    await second.client.close()

    # It comes back (a new owner imports it: the same ids), and then leaves for good: forgotten, it is withdrawn.
    third = await start(aiohttp_client, ews, store, (ROOM1, ROOM2))
    await eventually(lambda: third.gw.store.sync_state(ROOM2) and len(third.gw.store.bookings(ROOM2)) == 2,
                     what="ROOM2 imported again")
    assert sorted(e.data["id"] for e in third.events(ROOM2, CREATED)) == sorted([*ids, *ids])  # each twice, one id
    await third.client.close()
    outbox = SqliteStore(store)  # what consumers get from now on (the gateway is stopped)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"exchange:\n  ews_url: {ews.url}\n  allow_insecure_http: true\n  username: svc@contoso.com\n"
                      f"rooms:\n  mailboxes: [{ROOM1}, {ROOM2}]\nstore:\n  path: {store}\n")
    before = outbox.last_seq()
    try:
        assert service.forget(config, ROOM2) == 1  # still configured: it would come back at the next start
        assert outbox.last_seq() == before
        config.write_text(config.read_text().replace(f", {ROOM2}]", "]"))
        assert service.forget(config, ROOM2) == 0
        after = [e.event for e in outbox.outbox_after(before, 100)]
        assert [e.type for e in after] == [DELETED, DELETED, ROOM_STATE] and {e.room for e in after} == {ROOM2}
        assert {e.data["id"] for e in after[:2]} == ids
        assert all(e.data["reason"] == "room_disconnected" for e in after[:2])
        assert after[2].data["state"] == "disconnected" and after[2].data["remedy"] == ROOM_STATES["disconnected"]
        assert outbox.bookings(ROOM2) == [] and ROOM2 not in {r.email for r in outbox.rooms()}
    finally:
        outbox.close()


# -- 7. the mass-deletion guard ------------------------------------------------------------------------------------
class EmptyReads:
    """Wraps the gateway's source: the next ``empty`` full reads of one room come back with nothing, the way a
    broken read (a wrong folder, a proxy answering for Exchange) looks; ``gate`` holds a read until released."""

    def __init__(self, inner: Any, room: str) -> None:
        self.inner = inner
        self.room = room
        self.empty = 0
        self.reads = 0
        self.gate: asyncio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        if room != self.room:
            return list(await self.inner.read_window(room, window))
        self.reads += 1
        if self.gate is not None and self.reads > 1:
            await self.gate.wait()
        if self.empty > 0:
            self.empty -= 1
            return []
        return list(await self.inner.read_window(room, window))


async def test_room_that_suddenly_reads_empty_is_held_back_until_confirmed(ews, tmp_path, aiohttp_client):
    uids = {appointment(ews, ROOM1, f"Meeting {i}", soon(26 + 2 * i)) for i in range(6)}
    g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1,), reconcile_seconds=0.3)
    await eventually(lambda: len(g.events(ROOM1, CREATED)) == 6, what="the import")
    reads = EmptyReads(g.gw.coordinator.source, ROOM1)
    g.gw.coordinator.source = reads

    # A single empty read: held back, then cleared by the next read; nothing was ever deleted.
    reads.empty = 1
    await eventually(lambda: "suspect_empty" in g.states(ROOM1), what="suspect_empty")
    await eventually(lambda: g.states(ROOM1)[-1] == "verified", what="cleared")
    assert g.events(ROOM1, DELETED) == [] and len(g.gw.store.bookings(ROOM1)) == 6

    # From now on the room reads empty: the first read is held back, the second (held here until we have looked)
    # confirms it.
    reads.reads, reads.empty, reads.gate = 0, 1_000_000, asyncio.Event()
    await eventually(lambda: g.states(ROOM1)[-1] == "suspect_empty" and reads.reads == 2, what="suspect_empty again")
    row = (await g.rooms())[ROOM1]
    assert row["state"] == "suspect_empty" and row["remedy"] == ROOM_STATES["suspect_empty"]
    assert "6 were known" in row["reason"]
    assert await g.metric("gateway_rooms", state="suspect_empty") == 1
    assert g.events(ROOM1, DELETED) == [] and {b.uid for b in g.gw.store.bookings(ROOM1)} == uids
    reads.gate.set()
    deleted = await eventually(lambda: len(g.events(ROOM1, DELETED)) == 6 and g.events(ROOM1, DELETED),
                               what="the confirmed deletions")
    assert {e.data["uid"] for e in deleted} == uids
    assert all(e.data["reason"] == "removed_from_exchange" for e in deleted)
    await eventually(lambda: g.states(ROOM1)[-1] == "verified", what="verified after confirmation")
    assert g.gw.store.bookings(ROOM1) == []


# -- stopping ------------------------------------------------------------------------------------------------------
async def test_gateway_stops_even_when_a_room_is_marked_dirty_as_it_stops(ews, tmp_path, aiohttp_client):
    """A notification (or a feed reconnect) that lands just as the gateway stops must not keep its worker alive."""
    g = await start(aiohttp_client, ews, tmp_path / "g.sqlite", (ROOM1,), feed="poll", reconcile_seconds=3600.0)
    await eventually(lambda: g.imported(ROOM1), what="imported")
    await g.settled()
    worker = g.gw.coordinator.workers[ROOM1]
    g.gw.coordinator.mark_dirty(ROOM1, "notification")
    await asyncio.wait_for(g.gw.coordinator.stop(), 5.0)
    assert worker.task is not None and worker.task.cancelled()
