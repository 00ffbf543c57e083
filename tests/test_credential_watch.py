"""The credential watch: every credential's end, told once per threshold (across restarts), as metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gateway.credential_watch import (
    CredentialWatch,
    Watched,
    account_check,
    describe,
    last_known,
    relay_check,
)
from gateway.errors import AccountLocked, NotFound
from gateway.ports import AccountStatus, CredentialExpiry
from gateway.security.identity import GatewayIdentity
from tests.conftest import eventually

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Directory:
    """An AccountLookup as an LDAP directory answers it."""

    def __init__(self, **accounts: AccountStatus) -> None:
        self.accounts = accounts
        self.asked: list[str] = []

    async def account(self, name: str) -> AccountStatus:
        self.asked.append(name)
        if name not in self.accounts:
            raise NotFound(f"the directory has no account {name}")
        return self.accounts[name]


class Gate:
    """A source's outage gate (ports.Outage)."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.listeners: list[object] = []


def told(logs: list[dict], event: str) -> list[dict]:
    return [e for e in logs if e["event"] == event]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_each_threshold_is_told_once_and_not_again_after_a_restart(tmp_path):
    state = tmp_path / "state" / "credentials.json"
    clock = Clock()
    directory = Directory(svc=AccountStatus("svc", NOW + timedelta(days=40)))
    watched = [Watched("source:onprem", "password", account_check("source:onprem", "svc", directory), "exchange")]

    def watch() -> CredentialWatch:
        return CredentialWatch(watched, state_path=state, clock=clock)

    first = watch()
    with capture_logs() as logs:
        await first.check()  # 40 days ahead: nothing yet
        clock.now = NOW + timedelta(days=11)  # 29 days left
        await first.check()
        await first.check()
    warnings = told(logs, "credential.expires_soon")
    assert [w["threshold_days"] for w in warnings] == [30]
    assert warnings[0]["credential"] == "source:onprem" and "gateway credentials set exchange" in warnings[0]["remedy"]
    assert "never expire" in warnings[0]["remedy"]  # it says not to make it never expire

    with capture_logs() as logs:  # a restart: the 30-day warning is not told again, the 7-day one once
        again = watch()
        await again.check()
        clock.now = NOW + timedelta(days=34)  # 6 days left
        await again.check()
        await again.check()
        clock.now = NOW + timedelta(days=39, hours=1)  # 23 hours left
        await again.check()
    assert [w["threshold_days"] for w in told(logs, "credential.expires_soon")] == [7, 1]

    with capture_logs() as logs:
        clock.now = NOW + timedelta(days=41)
        await watch().check()
        await watch().check()
    assert len(told(logs, "credential.expired")) == 1
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600 and stat.S_IMODE(os.stat(state.parent).st_mode) == 0o700


async def test_a_start_close_to_the_end_tells_the_nearest_threshold_only_and_a_new_end_date_starts_afresh(tmp_path):
    clock = Clock()
    directory = Directory(svc=AccountStatus("svc", NOW + timedelta(days=5)))
    watch = CredentialWatch([Watched("source:onprem", "password", account_check("source:onprem", "svc", directory))],
                            state_path=tmp_path / "credentials.json", clock=clock)
    with capture_logs() as logs:
        await watch.check()
        directory.accounts["svc"] = AccountStatus("svc", NOW + timedelta(days=20))  # the password was changed
        await watch.check()
    assert [w["threshold_days"] for w in told(logs, "credential.expires_soon")] == [7, 30]


async def test_metrics_carry_known_expiries_only_and_lockouts(tmp_path):
    registry = CollectorRegistry()
    directory = Directory(svc=AccountStatus("svc", NOW + timedelta(days=3)),
                          forever=AccountStatus("forever", None),
                          bind=AccountStatus("bind", NOW + timedelta(days=90), locked_out=True))
    watch = CredentialWatch([
        Watched("source:onprem", "password", account_check("source:onprem", "svc", directory)),
        Watched("source:second", "password", account_check("source:second", "forever", directory)),
        Watched("directory:corp", "password", account_check("directory:corp", "bind", directory)),
        Watched("source:nodir", "password", account_check("source:nodir", "other", None)),
    ], state_path=None, clock=Clock())
    registry.register(watch.collector())
    with capture_logs() as logs:
        await watch.check()
        await watch.check()
    expiry = "gateway_credential_expiry_timestamp_seconds"
    soon = (NOW + timedelta(days=3)).timestamp()
    assert sample(registry, expiry, credential="source:onprem", kind="password") == soon
    assert sample(registry, expiry, credential="source:second", kind="password") is None  # never expires: no sample
    assert sample(registry, expiry, credential="source:nodir", kind="password") is None  # cannot be known
    assert sample(registry, "gateway_credential_locked_out", credential="directory:corp") == 1.0
    assert sample(registry, "gateway_credential_locked_out", credential="source:onprem") == 0.0
    locked = told(logs, "credential.locked_out")
    assert len(locked) == 1 and "Unlock-ADAccount" in locked[0]["remedy"]
    nodir = next(e for e in watch.current if e.credential == "source:nodir")
    assert not nodir.known and "without a directory" in nodir.detail


async def test_a_lockout_exchange_reported_is_known_without_a_directory_and_told_again_after_it_was_lifted():
    gate = Gate(AccountLocked("Exchange says the service account is locked out"))
    watch = CredentialWatch([Watched("source:onprem", "password",
                                     account_check("source:onprem", "svc", None, outage=gate), "exchange")],
                            state_path=None, clock=Clock())
    with capture_logs() as logs:
        await watch.check()
        await watch.check()
        gate.failure = None
        await watch.check()
        gate.failure = AccountLocked("locked again")
        await watch.check()
    assert len(told(logs, "credential.locked_out")) == 2
    assert describe(watch.current[0], NOW)[0] == "FAIL" and "LOCKED OUT" in describe(watch.current[0], NOW)[1]


async def test_a_check_that_raises_is_reported_not_fatal():
    class Broken:
        async def credential_expiry(self) -> list[CredentialExpiry]:
            raise RuntimeError("the token endpoint said no")

    directory = Directory()  # has no such account: NotFound
    watch = CredentialWatch([Watched("source:cloud", "client_secret", Broken().credential_expiry),
                             Watched("directory:corp", "password", account_check("directory:corp", "x", directory)),
                             Watched("relay", "relay_key", _fixed("relay", "relay_key", NOW + timedelta(days=60)))],
                            state_path=None, clock=Clock())
    with capture_logs() as logs:
        await watch.check()
        await watch.check()
    failed = told(logs, "credential.check_failed")
    assert [f["credential"] for f in failed] == ["source:cloud", "directory:corp"]  # once each, not per check
    assert "token endpoint said no" in failed[0]["error"]
    by_name = {e.credential: e for e in watch.current}
    assert not by_name["source:cloud"].known and "could not be checked" in by_name["source:cloud"].detail
    assert by_name["relay"].expires_at == NOW + timedelta(days=60)  # the others were checked all the same


async def test_relay_key_rotation_date_from_a_real_identity(vault):
    identity = GatewayIdentity.generate(vault)
    identity.enroll(gateway_id="gw-1", customer="acme", hub_url="wss://hub.example/v1/tunnel")
    created = identity.key_created_at
    clock = Clock(created + timedelta(days=85))  # a moved clock: five days before the rotation is due
    registry = CollectorRegistry()
    watch = CredentialWatch([Watched("relay", "relay_key", relay_check(identity, timedelta(days=90)))],
                            state_path=None, clock=clock)
    registry.register(watch.collector())
    with capture_logs() as logs:
        await watch.check()  # the gateway rotates it itself on the day: no warning ahead
        clock.now = created + timedelta(days=92)  # two days overdue: rotation is failing
        await watch.check()
        await watch.check()
    assert registry.get_sample_value("gateway_credential_expiry_timestamp_seconds",
                                     {"credential": "relay", "kind": "relay_key"}) == \
        (created + timedelta(days=90)).timestamp()
    assert told(logs, "credential.expires_soon") == []
    overdue = told(logs, "credential.expired")
    assert len(overdue) == 1 and "gateway rotate-key" in overdue[0]["remedy"]

    identity.begin_rotation()
    identity.commit_rotation()  # rotated (by another process: the check re-reads the vault)
    await watch.check()
    assert watch.current[0].expires_at == GatewayIdentity.load(vault).key_created_at + timedelta(days=90)


async def test_the_last_results_are_readable_from_the_state_file(tmp_path):
    state = tmp_path / "credentials.json"
    directory = Directory(svc=AccountStatus("svc", NOW + timedelta(days=3)))
    watch = CredentialWatch([Watched("source:onprem", "password", account_check("source:onprem", "svc", directory),
                                     "exchange")], state_path=state, clock=Clock())
    await watch.check()
    checked_at, found = last_known(state)
    assert checked_at == NOW
    [(expiry, entry)] = found
    assert expiry.expires_at == NOW + timedelta(days=3) and entry == "exchange"
    mark, text = describe(expiry, NOW)
    assert mark == "warn" and "in 3.0 days" in text


def test_a_missing_or_damaged_state_file_is_no_state(tmp_path):
    (tmp_path / "credentials.json").write_text("{not json")
    assert last_known(tmp_path / "credentials.json") == (None, [])
    assert last_known(tmp_path / "absent.json") == (None, [])


def _fixed(credential: str, kind: str, at: datetime):
    async def check() -> list[CredentialExpiry]:
        return [CredentialExpiry(credential, kind, at)]
    return check



async def test_a_check_that_fails_for_a_while_does_not_make_the_warnings_told_again(tmp_path):
    clock = Clock()
    directory = Directory(svc=AccountStatus("svc", NOW + timedelta(days=5)))
    watched = [Watched("source:onprem", "password", account_check("source:onprem", "svc", directory))]
    state = tmp_path / "credentials.json"
    with capture_logs() as logs:
        await CredentialWatch(watched, state_path=state, clock=clock).check()
        saved = directory.accounts.pop("svc")  # the directory cannot answer for a while
        await CredentialWatch(watched, state_path=state, clock=clock).check()
        directory.accounts["svc"] = saved
        await CredentialWatch(watched, state_path=state, clock=clock).check()
    assert len(told(logs, "credential.expires_soon")) == 1


async def test_a_disabled_account_is_an_error_once_with_its_remedy():
    directory = Directory(svc=AccountStatus("svc", None, disabled=True))
    watch = CredentialWatch([Watched("source:onprem", "password", account_check("source:onprem", "svc", directory))],
                            state_path=None, clock=Clock())
    with capture_logs() as logs:
        await watch.check()
        await watch.check()
    [disabled] = told(logs, "credential.disabled")
    assert disabled["log_level"] == "error" and "enable" in disabled["remedy"]
    assert describe(watch.current[0], NOW) == ("FAIL", "DISABLED; never expires")


async def test_a_wake_checks_at_once_so_a_lockout_exchange_reports_is_not_an_hour_late():
    gate = Gate()
    watch = CredentialWatch([Watched("source:onprem", "password",
                                     account_check("source:onprem", "svc", None, outage=gate))],
                            state_path=None, clock=Clock())
    task = asyncio.get_running_loop().create_task(watch.run(3600))
    try:
        await eventually(lambda: watch.checked_at is not None, what="the first check")
        assert not watch.current[0].locked_out
        gate.failure = AccountLocked("Exchange says the service account is locked out")
        watch.wake()  # what the source's outage gate tells the wiring
        await eventually(lambda: watch.current[0].locked_out, what="the lockout checked at once")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class HoldingGate(Gate):
    """A gate that can be told of a lockout (sources/outage.py's hold and release)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    def hold(self, failure: Exception) -> None:
        self.held.append(f"hold {type(failure).__name__}")
        self.failure = failure

    def release(self) -> None:
        self.held.append("release")


async def test_a_lockout_the_directory_reports_holds_the_sources_logons_and_its_end_releases_them():
    gate = HoldingGate()
    directory = Directory(svc=AccountStatus("svc", None, locked_out=True, bad_password_count=3))
    check = account_check("source:onprem", "svc", directory, outage=gate)
    [found] = await check()
    assert found.locked_out and gate.held == ["hold AccountLocked"]
    assert "svc" in str(gate.failure) and "Active Directory" in str(gate.failure)
    directory.accounts["svc"] = AccountStatus("svc", None)
    await check()
    assert gate.held == ["hold AccountLocked", "release"]
    gate.failure = None
    await check()
    assert gate.held == ["hold AccountLocked", "release"]  # nothing held: nothing to release


async def test_while_an_account_is_locked_out_the_watch_checks_again_within_a_minute():
    gate = HoldingGate()
    directory = Directory(svc=AccountStatus("svc", None, locked_out=True))
    watch = CredentialWatch([Watched("source:onprem", "password",
                                     account_check("source:onprem", "svc", directory, outage=gate))],
                            state_path=None, clock=Clock(), locked_recheck_seconds=0.05)
    task = asyncio.get_running_loop().create_task(watch.run(3600))
    try:
        await eventually(lambda: len(directory.asked) >= 3, what="checks while locked, not hourly")
        directory.accounts["svc"] = AccountStatus("svc", None)
        gate.failure = None
        await eventually(lambda: watch.checked_at is not None and not watch.current[0].locked_out,
                         what="the unlock seen")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
