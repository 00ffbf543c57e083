"""The gateway's files on disk: created private (0600 files, 0700 folders), looser existing ones reported, and a
place it cannot write named with its fix instead of a traceback."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.hub.store import HubStore
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.store.sqlite import SqliteStore
from tests.conftest import SimFixture

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GATEWAY_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT), "GW_TEST_PASSWORD": SERVICE_PASSWORD}
NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what most services run with: files 0644, folders 0755 unless the code says otherwise
    try:
        yield
    finally:
        os.umask(old)


def test_the_store_and_its_folder_are_created_private(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "var" / "data" / "gateway.sqlite"
    store = SqliteStore(path)
    try:
        assert mode(tmp_path / "var") == 0o700 and mode(tmp_path / "var" / "data") == 0o700
        for name in ("gateway.sqlite", "gateway.sqlite-wal", "gateway.sqlite-shm"):
            assert mode(path.parent / name) == 0o600, name
    finally:
        store.close()
    assert os.umask(0o022) == 0o022  # the process umask is back as it was


def test_the_hub_store_is_created_private(tmp_path: Path, usual_umask: None) -> None:
    store = HubStore.in_dir(tmp_path / "hub")
    try:
        assert mode(tmp_path / "hub") == 0o700
        for name in ("hub.db", "hub.db-wal", "hub.db-shm"):
            assert mode(tmp_path / "hub" / name) == 0o600, name
    finally:
        store.close()


def test_a_loose_existing_store_is_reported_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "data" / "gateway.sqlite"
    SqliteStore(path).close()
    path.chmod(0o644)
    path.parent.chmod(0o755)
    with capture_logs() as logs:
        SqliteStore(path).close()
    warned = {e["path"]: e for e in logs if e["event"] == "store.permissions_too_open"}
    # SQLite gives the -wal and -shm files the database's mode: loose too
    assert set(warned) == {str(path), f"{path}-wal", f"{path}-shm", str(path.parent)}, logs
    assert warned[str(path)]["remedy"] == f"chmod 600 {path}" and warned[str(path)]["mode"] == "644"
    assert warned[str(path.parent)]["remedy"] == f"chmod 700 {path.parent}"
    assert mode(path) == 0o644  # an operator may have opened it to a backup group on purpose: only reported


def test_a_store_path_that_cannot_be_created_names_the_path_and_the_fix(tmp_path: Path) -> None:
    # A regular file where the data folder should be stops root too (ENOTDIR), unlike a read-only mode bit.
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        SqliteStore(tmp_path / "data" / "gateway.sqlite")
    assert err.value.key == "state_unwritable"
    assert str(tmp_path / "data") in str(err.value) and "store.path" in err.value.remedy
    with pytest.raises(ConfigError) as hub_err:
        HubStore.in_dir(tmp_path / "data" / "hub")
    assert hub_err.value.key == "state_unwritable" and "--data" in hub_err.value.remedy


# -- a read-only data folder, as the commands meet it ----------------------------------------------------------
def unprivileged() -> tuple[list[str], int]:
    """How to run a command as a user who cannot write a folder made read-only, and that user's uid.

    As root (the test container), chmod stops nobody, so the command runs as nobody through setpriv; as any other
    user the mode bits suffice and it runs as that user.
    """
    if os.geteuid() != 0:
        return [], os.geteuid()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to be refused a write")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import gateway.cli"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run this interpreter: {probe.stderr[-300:]}")
    return prefix, NOBODY


@pytest.fixture
def read_only_setup(ews: SimFixture) -> Iterator[tuple[Path, Path]]:
    """A configuration readable by everyone whose data folder exists but cannot be written."""
    work = Path(tempfile.mkdtemp(prefix="gateway-ro-"))
    work.chmod(0o755)
    data = work / "data"
    data.mkdir()
    cfg = work / "gateway.yaml"
    cfg.write_text(f"""
exchange:
  ews_url: {ews.url}
  allow_insecure_http: true
  username: 'CONTOSO\\{SERVICE_ACCOUNT}'
  password_ref: env:GW_TEST_PASSWORD
rooms:
  mailboxes: [room1@contoso.com]
store:
  path: {data / "gateway.sqlite"}
vault:
  path: {data / "credentials.vault"}
  key_file: {work / "vault.key"}
api:
  port: 1
""")
    cfg.chmod(0o644)
    data.chmod(0o555)
    try:
        yield cfg, data
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("command", [("doctor",), ("run",), ("api-keys", "create", "display", "--scope", "read")])
def test_a_read_only_data_folder_is_named_with_its_fix_not_a_traceback(read_only_setup: tuple[Path, Path],
                                                                       command: tuple[str, ...]) -> None:
    cfg, data = read_only_setup
    prefix, uid = unprivileged()
    result = subprocess.run([*prefix, sys.executable, "-m", "gateway", *command, "--config", str(cfg)], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "OperationalError" not in output, output
    assert str(data / "gateway.sqlite") in output, output
    assert f"make {data} (and the gateway's files in it) writable by uid {uid}" in output, output
    assert "store.path" in output
    if command == ("doctor",):
        store_line = next(ln for ln in result.stdout.splitlines() if " store " in f" {ln} ")
        assert store_line.startswith("FAIL") and "state_unwritable" in store_line, result.stdout
        assert any(ln.startswith("ok") and "room1@contoso.com" in ln for ln in result.stdout.splitlines())
    assert not list(data.iterdir())


# -- doctor ----------------------------------------------------------------------------------------------------
def test_doctor_creates_the_data_folder_private_and_warns_about_loose_files(ews: SimFixture, tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"""
exchange:
  ews_url: {ews.url}
  allow_insecure_http: true
  username: 'CONTOSO\\{SERVICE_ACCOUNT}'
  password_ref: vault:exchange
rooms:
  mailboxes: [room1@contoso.com]
store:
  path: {data / "gateway.sqlite"}
vault:
  path: {tmp_path / "vault" / "credentials.vault"}
  key_file: {tmp_path / "keys" / "vault.key"}
""")

    def gateway(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(cfg)], cwd=ROOT, env=ENV,
                              input=stdin, capture_output=True, text=True, timeout=120)

    stored = gateway("credentials", "set", "exchange", "--stdin", stdin=SERVICE_PASSWORD)
    assert stored.returncode == 0, stored.stderr
    first = gateway("doctor")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warn" not in first.stdout
    assert mode(data) == 0o700 and mode(data / "gateway.sqlite") == 0o600

    (data / "gateway.sqlite").chmod(0o644)
    (tmp_path / "vault" / "credentials.vault").chmod(0o640)
    (tmp_path / "keys" / "vault.key").chmod(0o644)
    data.chmod(0o755)
    second = gateway("doctor")
    assert second.returncode == 0, second.stdout + second.stderr  # warnings, not failures
    warnings = [ln for ln in second.stdout.splitlines() if ln.startswith("warn")]
    assert all("state_permissions_too_open" in ln for ln in warnings)
    remedies = {ln.split("-> ")[1].split(" (")[0] for ln in warnings}
    assert remedies == {f"chmod 600 {data / 'gateway.sqlite'}", f"chmod 700 {data}",
                        f"chmod 600 {tmp_path / 'vault' / 'credentials.vault'}",
                        f"chmod 600 {tmp_path / 'keys' / 'vault.key'}"}, second.stdout
    assert second.stdout.strip().endswith("all green")
