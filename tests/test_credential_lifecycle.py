"""Credentials over their life, end to end: a password replaced with `gateway credentials set` while `gateway run`
runs is used without a restart; each credential's end date and lockout reach the metrics, the logs, `gateway rooms`
and `gateway doctor`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from tests.conftest import ControlClient, free_port, wait_for
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
