"""The credential watch against a real Active Directory (Samba): a service account whose password AD computes to
expire in five days (msDS-UserPasswordExpiryTimeComputed) is a metric and one warning; the bind account, whose
password never expires, has no expiry sample; `gateway doctor` and the state file tell the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from gateway.app import DIRECTORY, GatewayOptions, start_gateway, stop_gateway
from gateway.credential_watch import last_known
from gateway.directory.ldap import LdapSettings
from gateway.directory_service import DirectoryOptions
from gateway.ports import SourceSpec
from gateway.sources.ews.source import EwsSettings
from gateway.sources.memory import MemorySource
from gateway.sync.coordinator import SyncSettings
from tests.conftest import eventually
from tests.gateway_cli import gateway
from tests.ldap_server import (
    BASE,
    BIND_DN,
    DOMAIN,
    EXPIRING,
    LOCKABLE,
    MAIL,
    PASSWORD,
    SERVER_NAME,
    SERVICE_OU,
    SambaDC,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ldap")]


class LoggingOn(MemorySource):
    """A calendar source that logs on as an AD service account (what the credential watch asks the directory
    about: ``settings.username``), as an EWS source does."""

    username = f"{DOMAIN}\\{EXPIRING}"


async def test_a_password_ad_says_expires_in_five_days_is_a_metric_and_one_warning(
        tmp_path: Path, samba: SambaDC) -> None:
    exchange = LoggingOn()
    exchange.add_room(f"room1@{MAIL}", "Room 1")
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME)
    options = GatewayOptions(sources=(SourceSpec("onprem", "memory", exchange, rooms=(f"room1@{MAIL}",)),),
                             store_path=tmp_path / "data" / "gateway.sqlite", feed="poll",
                             secret_entries={"onprem": "exchange"},
                             directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600))
    with capture_logs() as logs:
        gw = await start_gateway(options)
        try:
            watch = gw.credentials
            assert watch is not None
            await eventually(lambda: watch.checked_at is not None, what="the first credential check")
            assert gw.runner is not None
            runner = gw.runner.app[DIRECTORY]
            assert runner is not None  # its first people sync ends before the gateway stops (no bind left in flight)
            await eventually(lambda: runner.syncs or runner.failure, what="the directory's first sync")
            await watch.check()  # the next hourly one: nothing new to say
            by_name = {e.credential: e for e in watch.current}
            registry = gw.metrics.registry
            expiry = {c: registry.get_sample_value("gateway_credential_expiry_timestamp_seconds",
                                                   {"credential": c, "kind": "password"})
                      for c in ("source:onprem", "directory:corp")}
            locked = registry.get_sample_value("gateway_credential_locked_out", {"credential": "directory:corp"})
        finally:
            await stop_gateway(gw)
    source = by_name["source:onprem"]
    assert source.known and source.expires_at is not None and not source.locked_out
    left = source.expires_at - datetime.now(UTC)
    assert timedelta(days=4) < left <= timedelta(days=5), left  # its password was set at the session's start
    assert expiry["source:onprem"] == source.expires_at.timestamp()
    bind = by_name["directory:corp"]
    assert bind.known and bind.expires_at is None  # never expires: no sample
    assert expiry["directory:corp"] is None and locked == 0
    soon = [e for e in logs if e["event"] == "credential.expires_soon"]
    assert [(e["credential"], e["threshold_days"]) for e in soon] == [("source:onprem", 7)]
    assert "gateway credentials set exchange" in soon[0]["remedy"]
    _, stored = last_known(tmp_path / "data" / "credentials.json")
    assert {e.credential for e, _ in stored} == {"source:onprem", "directory:corp"}


def doctor_config(tmp_path: Path, samba: SambaDC, ews: Any, username: str) -> Path:
    """A configuration with one EWS source logging on as ``username`` and the Samba directory, secrets in its vault."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "exchange": {"ews_url": ews.url, "allow_insecure_http": True, "username": username,
                     "password_ref": "vault:exchange"},
        "rooms": {"mailboxes": ["room1@contoso.com"]},
        "store": {"path": str(tmp_path / "data" / "gateway.sqlite")},
        "vault": {"path": str(tmp_path / "data" / "credentials.vault"), "key_file": str(tmp_path / "vault.key")},
        "directory": {"name": "corp", "urls": [samba.ldaps_url], "bind": f"{DOMAIN}\\svc-ldap",
                      "password_ref": "vault:ldap", "ca_bundle": str(samba.ca), "server_name": SERVER_NAME,
                      "base_dn": BASE}}))
    for name in ("exchange", "ldap"):
        assert gateway("credentials", "set", name, "--stdin", "--config", str(cfg), stdin=PASSWORD).returncode == 0
    return cfg


def test_doctor_asks_the_directory_about_each_account(tmp_path: Path, samba: SambaDC, ews: Any) -> None:
    cfg = doctor_config(tmp_path, samba, ews, f"{DOMAIN}\\{EXPIRING}")
    doctor = gateway("doctor", "--config", str(cfg))
    lines = {line.split()[2]: line for line in doctor.stdout.splitlines() if line.split()[1:2] == ["credential"]}
    assert set(lines) == {"source:exchange", "directory:corp"}, doctor.stdout
    assert lines["source:exchange"].startswith("warn") and "credential_expires_soon" in lines["source:exchange"]
    assert f"`gateway credentials set exchange --config {cfg}`" in lines["source:exchange"]
    assert lines["directory:corp"].startswith("ok") and "never expires" in lines["directory:corp"]


def _ews_calls(ews: Any) -> int:
    """The EWS requests the simulated Exchange has answered (each behind a logon on a new connection)."""
    return int(ews.call(lambda: sum(ews.sim.calls.values())))


def lockable_gateway(tmp_path: Path, samba: SambaDC, ews: Any, rooms: tuple[str, ...]) -> GatewayOptions:
    """A gateway whose service account is the same in AD (its policy locks it after 3 bad passwords) and in the
    simulated Exchange, with the Samba directory."""
    ews.call(lambda: ews.sim.directory.add_mailbox(f"{LOCKABLE}@contoso.com", "Lockable Service", "user",
                                                   password=PASSWORD, impersonation="rooms"))
    settings = LdapSettings(urls=(samba.ldaps_url,), bind=BIND_DN, base_dn=BASE, ca_file=str(samba.ca),
                            server_name=SERVER_NAME)
    return GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{LOCKABLE}", default_timezone="Europe/Berlin",
                        max_workers=4, auth_retry_seconds=3600.0),
        password=PASSWORD, rooms=rooms, store_path=tmp_path / "data" / "gateway.sqlite", feed="poll",
        sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, auth_retry_seconds=0.3),
        directory=DirectoryOptions("corp", settings, PASSWORD, sync_seconds=3600))


async def test_while_ad_says_the_service_account_is_locked_out_no_logon_goes_to_exchange(
        tmp_path: Path, samba: SambaDC, ews: Any) -> None:
    rooms = ("room1@contoso.com", "room2@contoso.com", "room3@contoso.com")
    options = lockable_gateway(tmp_path, samba, ews, rooms)
    account = f"CN={LOCKABLE},{SERVICE_OU}"
    gw = await start_gateway(options)
    try:
        await eventually(lambda: all(gw.coordinator.workers[r].state == "verified" for r in rooms), what="verified")
        watch = gw.credentials
        assert watch is not None
        samba.lock_out(account)  # someone else tries the account with a wrong password: AD locks it
        await watch.check()  # the credential watch asks AD: locked out
        assert any(e.locked_out for e in watch.current)
        gate = gw.sources["exchange"].opened.outage
        assert gate is not None and gate.failure is not None and gate.failure.key == "account_locked"
        calls = _ews_calls(ews)
        for r in rooms:
            gw.coordinator.mark_dirty(r, "test")
        # the stored row, not the worker's state: a worker takes its new state before the store has committed it
        await eventually(lambda: all(r.state == "account_locked" for r in gw.store.rooms()),
                         what="every room stored as account_locked")
        assert _ews_calls(ews) == calls  # held at the gate: no logon reached Exchange
        reasons = {r.email: r.reason for r in gw.store.rooms()}
        assert "Active Directory says the service account" in reasons[rooms[0]], reasons

        samba.unlock(account)  # an administrator unlocks it
        await watch.check()  # AD says unlocked: the gate lets one probe through now, not after its hour
        await eventually(lambda: all(gw.coordinator.workers[r].state == "verified" for r in rooms), what="recovered")
        assert _ews_calls(ews) > calls
    finally:
        await stop_gateway(gw)
        samba.unlock(account)


def test_doctor_makes_no_exchange_logon_while_ad_says_the_service_account_is_locked_out(
        tmp_path: Path, samba: SambaDC, ews: Any) -> None:
    ews.call(lambda: ews.sim.directory.add_mailbox(f"{LOCKABLE}@contoso.com", "Lockable Service", "user",
                                                   password=PASSWORD, impersonation="rooms"))
    cfg = doctor_config(tmp_path, samba, ews, f"CONTOSO\\{LOCKABLE}")
    account = f"CN={LOCKABLE},{SERVICE_OU}"
    samba.lock_out(account)
    try:
        doctor = gateway("doctor", "--config", str(cfg))
    finally:
        samba.unlock(account)
    assert doctor.returncode == 1, doctor.stdout
    [logon] = [line for line in doctor.stdout.splitlines() if f"Exchange {ews.url}" in line]
    assert logon.startswith("FAIL") and "account_locked" in logon and "Active Directory says" in logon, logon
    [credential] = [line for line in doctor.stdout.splitlines() if "credential source:exchange" in line]
    assert "LOCKED OUT" in credential and "Unlock-ADAccount" in credential
    assert _ews_calls(ews) == 0 and ews.call(lambda: ews.sim.failed_logons) == 0  # not a single logon


async def test_a_gateway_started_while_ad_says_its_account_is_locked_out_makes_no_logon_until_unlocked(
        tmp_path: Path, samba: SambaDC, ews: Any) -> None:
    rooms = ("room1@contoso.com", "room2@contoso.com")
    options = lockable_gateway(tmp_path, samba, ews, rooms)
    account = f"CN={LOCKABLE},{SERVICE_OU}"
    samba.lock_out(account)
    try:
        gw = await start_gateway(options)
        try:
            await eventually(lambda: all(gw.coordinator.workers[r].state == "account_locked" for r in rooms),
                             what="every room held as account_locked")
            assert _ews_calls(ews) == 0  # not even the first logon
            samba.unlock(account)
            assert gw.credentials is not None
            await gw.credentials.check()
            await eventually(lambda: all(gw.coordinator.workers[r].state == "verified" for r in rooms),
                             what="recovered")
        finally:
            await stop_gateway(gw)
    finally:
        samba.unlock(account)
