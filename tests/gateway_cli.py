"""The `gateway` command in a subprocess, as an admin runs it, with a configuration file written for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.simulator.seed import SERVICE_ACCOUNT

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GATEWAY_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}


def write_config(tmp: Path, url: str, rooms: list[str], port: int, *, room_lists: tuple[str, ...] = (),
                 account: str = SERVICE_ACCOUNT, password_ref: str = "vault:exchange", mode: str = "streaming",
                 name: str = "gateway.yaml") -> Path:
    cfg = tmp / name
    cfg.write_text(f"""
exchange:
  ews_url: {url}
  allow_insecure_http: true
  username: 'CONTOSO\\{account}'
  password_ref: {password_ref}
  default_timezone: Europe/Berlin
rooms:
  mailboxes: [{", ".join(rooms)}]
  room_lists: [{", ".join(room_lists)}]
sync:
  mode: {mode}
  debounce_seconds: 0.2
  streaming_connection_timeout_minutes: 1
store:
  path: {tmp / "data" / "gateway.sqlite"}
vault:
  path: {tmp / "data" / "credentials.vault"}
  key_file: {tmp / "secrets" / "vault.key"}
api:
  port: {port}
""")
    return cfg


def gateway(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)
