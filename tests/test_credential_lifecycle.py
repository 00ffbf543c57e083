"""Credentials over their life, end to end: a password replaced with `gateway credentials set` while `gateway run`
runs is used without a restart; each credential's end date and lockout reach the metrics, the logs, `gateway rooms`
and `gateway doctor`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from gateway import service
from gateway.app import GATEWAY, GatewayOptions, init_app, start_gateway, stop_gateway
from gateway.config import RelayConfig
from gateway.ports import AccountStatus, SourceSpec
from gateway.relay.enroll import enroll
from gateway.relay.rotation import ROTATE_AFTER
from gateway.security.identity import GatewayIdentity
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.memory import MemorySource
from tests.conftest import ControlClient, eventually, free_port, wait_for
from tests.gateway_cli import ENV, ROOT, gateway, write_config

NEW_PASSWORD = "Rotated-Passw0rd-2!"
ROOM = "room1@contoso.com"


def _get(url: str, key: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        body = resp.read().decode()
    return json.loads(body) if resp.headers.get("Content-Type", "").startswith("application/json") else body


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def _stop(proc: subprocess.Popen[str], stderr: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(stderr.read_text()[-6000:]) from None


def _booked(port: int, key: str, uid: str) -> bool:
    try:
        bookings = _get(f"http://127.0.0.1:{port}/v1/rooms/{ROOM}/bookings", key)["bookings"]
    except OSError:
        return False
    return uid.lower() in json.dumps(bookings).lower()  # (the room's attendant replaces the subject)


def test_a_password_replaced_in_the_vault_is_used_by_the_running_gateway_without_a_restart(ews, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, ews.url, [ROOM], port)
    assert gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin",
                   stdin=SERVICE_PASSWORD).returncode == 0
    key = gateway("api-keys", "create", "test", "--scope", "read", "--config", str(cfg)).stdout.strip()
    ctl = ControlClient(ews)
    stderr = tmp_path / "gateway.err"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(cfg)], env=ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)

        def book(subject: str) -> str:
            status, body = ctl("POST", "/meetings", {
                "organizer": "alice@contoso.com", "rooms": [ROOM], "subject": subject,
                "start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(), "wait": True})
            assert status == 201, body
            return str(body["uid"])

        first = book("Before the rotation")
        wait_for(lambda: _booked(port, key, first), 90, "the first booking")
        # The gateway in its steady state, the room's stream open: a connection it opened between the change in
        # Active Directory and the vault would log on with the old password once, as any client would.
        wait_for(lambda: ews.call(lambda: any(s.subs for s in ews.sim.notifications.streams)), 60,
                 "the room's stream")

        # The administrator changes the password in Active Directory, then stores it in the gateway's vault.
        account = f"{SERVICE_ACCOUNT}@contoso.com"
        ews.call(lambda: setattr(ews.sim.directory.get(account), "password", NEW_PASSWORD))
        stored = gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin", stdin=NEW_PASSWORD)
        assert stored.returncode == 0, stored.stderr
        wait_for(lambda: any(e["event"] == "credentials.picked_up" for e in _log_events(stderr)), 60,
                 "the running gateway to pick the new password up")
        # Every connection Exchange had authenticated is forgotten (an app-pool recycle): each one logs on again.
        assert ctl("POST", "/restart")[0] == 200

        start += timedelta(hours=2)
        second = book("After the rotation")
        wait_for(lambda: _booked(port, key, second), 90, "a booking made after the rotation")
        assert proc.poll() is None  # no restart
        assert ews.call(lambda: ews.sim.failed_logons) == 0  # the old password was never tried again
        states = {r["email"]: r["state"] for r in _get(f"http://127.0.0.1:{port}/v1/rooms", key)["rooms"]}
        assert states[ROOM] == "verified"

        # SIGHUP reads the secrets again at once (nothing changed: nothing is handed over).
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "credentials.reread" and e.get("why") == "signal"
                             for e in _log_events(stderr)), 30, "SIGHUP to read the secrets again")
        assert proc.poll() is None
    finally:
        _stop(proc, stderr)
    text = stderr.read_text()
    assert NEW_PASSWORD not in text and SERVICE_PASSWORD not in text


class Directory:
    """The organisation's directory as the credential watch asks it (ports.AccountLookup), answering for the
    service account; its state is what a test sets (h/ldap's directory answers from Active Directory)."""

    def __init__(self, status: AccountStatus) -> None:
        self.status = status
        self.asked: list[str] = []

    async def account(self, name: str) -> AccountStatus:
        self.asked.append(name)
        return self.status


class LoggingOn(MemorySource):
    """A calendar source that logs on as a service account (``settings.username``, as an EWS source does)."""

    username = f"CONTOSO\\{SERVICE_ACCOUNT}"


async def test_a_service_account_expiring_soon_or_locked_out_is_a_metric_a_warning_and_a_line_in_rooms(
        tmp_path, aiohttp_client, capsys):
    ends = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    directory = Directory(AccountStatus(f"CONTOSO\\{SERVICE_ACCOUNT}", ends))
    exchange = LoggingOn()
    exchange.add_room(ROOM, "Room 1")
    store = tmp_path / "data" / "g.sqlite"
    with capture_logs() as logs:
        client = await aiohttp_client(init_app(GatewayOptions(
            sources=(SourceSpec("exchange", "memory", exchange, rooms=(ROOM,)),), store_path=store, feed="poll",
            accounts=directory, secret_entries={"exchange": "exchange"})))
        gw = client.app[GATEWAY]

        def metric(name: str, **labels: str) -> float | None:
            return gw.metrics.registry.get_sample_value(name, labels)
        expiry = "gateway_credential_expiry_timestamp_seconds"
        await eventually(lambda: directory.asked, what="the directory asked about the service account")
        assert directory.asked[0] == f"CONTOSO\\{SERVICE_ACCOUNT}"
        await eventually(lambda: metric(expiry, credential="source:exchange", kind="password") == ends.timestamp(),
                         what="the expiry metric")
        assert metric("gateway_credential_locked_out", credential="source:exchange") == 0
        watch = gw.credentials
        assert watch is not None
        await watch.check()  # the next hourly check: nothing new to say
        soon = [e for e in logs if e["event"] == "credential.expires_soon"]
        assert len(soon) == 1 and soon[0]["threshold_days"] == 7 and soon[0]["log_level"] == "warning"
        assert "gateway credentials set exchange" in soon[0]["remedy"]
        async def ready() -> bool:  # a close end date leaves the gateway ready (asked until the import has ended)
            return (await client.get("/readyz")).status == 200
        await eventually(ready, what="/readyz 200 with a password that ends in 5 days")

        directory.status = AccountStatus(directory.status.name, ends, locked_out=True, bad_password_count=5)
        await watch.check()
        assert metric("gateway_credential_locked_out", credential="source:exchange") == 1
        locked = [e for e in logs if e["event"] == "credential.locked_out"]
        assert len(locked) == 1 and locked[0]["log_level"] == "error" and "Unlock-ADAccount" in locked[0]["remedy"]
        ready = await client.get("/readyz")  # the reason is named on the open endpoint too (no address)
        assert ready.status == 503
        assert "credential source:exchange: the account is locked out; see `gateway doctor`" in \
            (await ready.json())["reasons"]

    service.print_credentials(store.parent / "credentials.json", (30, 7, 1))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CREDENTIAL") and "KIND" in out[0]
    [line] = [row for row in out if row.startswith("source:exchange")]
    assert "FAIL" in line and "LOCKED OUT" in line and "Unlock-ADAccount" in line


def test_doctor_shows_each_credential_and_what_cannot_be_known_without_a_directory(ews, tmp_path):
    cfg = write_config(tmp_path, ews.url, [ROOM], free_port())
    assert gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin",
                   stdin=SERVICE_PASSWORD).returncode == 0
    doctor = gateway("doctor", "--config", str(cfg))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    [line] = [row for row in doctor.stdout.splitlines() if "credential source:exchange (password)" in row]
    assert line.startswith("ok") and "expiry_unknown" in line and "without a directory" in line, line
    assert doctor.stdout.rstrip().endswith("all green")


def _pem(tmp_path: Path, days: int) -> tuple[Path, datetime]:
    """A certificate and its private key as an app registration's credential is kept (PEM), ending in ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway app")])
    now = datetime.now(UTC).replace(microsecond=0)
    ends = now + timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(ends).sign(key, hashes.SHA256()))
    path = tmp_path / "app.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return path, ends


def test_a_certificate_stored_from_its_pem_file_says_its_end_and_a_damaged_one_is_refused(tmp_path):
    cfg = write_config(tmp_path, "http://127.0.0.1:9/EWS/Exchange.asmx", [ROOM], free_port())
    pem, ends = _pem(tmp_path, 20)
    stored = gateway("credentials", "set", "graph", "--file", str(pem), "--config", str(cfg))
    assert stored.returncode == 0, stored.stderr
    assert f"its certificate is valid until {ends.isoformat()}" in stored.stdout
    assert "picks it up within seconds" in stored.stdout and "PRIVATE KEY" not in stored.stdout + stored.stderr

    damaged = tmp_path / "damaged.pem"
    damaged.write_text(pem.read_text().replace("-----BEGIN CERTIFICATE-----\n", "-----BEGIN CERTIFICATE-----\nAAAA"))
    refused = gateway("credentials", "set", "graph-2", "--file", str(damaged), "--config", str(cfg))
    assert refused.returncode == 2 and "invalid_certificate" not in refused.stdout
    assert "cannot be read" in refused.stderr and "nothing was stored" in refused.stderr
    listed = gateway("credentials", "list", "--config", str(cfg))
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["graph"]


async def test_the_relay_keys_rotation_date_follows_the_key_a_real_hub_confirmed(hub, customer, pki, vault, tmp_path):
    relay = RelayConfig(enabled=True, ca_bundle=pki.ca_file, heartbeat_seconds=5, reconnect_max_seconds=1)
    identity = await enroll(hub.url, await hub.token(), vault=vault, relay=relay, name="credentials")
    relay = replace(relay, hub_url=identity.hub_url)
    rooms = MemorySource()
    rooms.add_room(ROOM, "Room 1")
    gw = await start_gateway(GatewayOptions(sources=(SourceSpec("onprem", "memory", rooms, rooms=(ROOM,)),),
                                            store_path=tmp_path / "data" / "g.sqlite", feed="poll", relay=relay,
                                            identity=identity))
    try:
        watch, tunnel = gw.credentials, gw.tunnel
        assert watch is not None and tunnel is not None

        def due() -> float | None:
            return gw.metrics.registry.get_sample_value("gateway_credential_expiry_timestamp_seconds",
                                                        {"credential": "relay", "kind": "relay_key"})
        first = GatewayIdentity.load(vault)
        await eventually(lambda: due() == (first.key_created_at + ROTATE_AFTER).timestamp(),
                         what="the relay key's rotation date")
        await eventually(lambda: hub.session(identity.gateway_id) is not None, 30, "the gateway's tunnel")
        await tunnel.rotate_key()  # confirmed by the hub: the rotation date moves with the new key
        await watch.check()
        rotated = GatewayIdentity.load(vault)
        assert rotated.key_id != first.key_id
        assert due() == (rotated.key_created_at + ROTATE_AFTER).timestamp()
        [relay_line] = [e for e in watch.current if e.credential == "relay"]
        assert relay_line.detail == f"key {rotated.key_id}"
    finally:
        await stop_gateway(gw)
