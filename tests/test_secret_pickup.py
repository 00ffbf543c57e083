"""A secret replaced in the vault reaches its user without a restart: the vault file's change is noticed cheaply (a
stat), a wake (SIGHUP) reads every secret at once, and a read that fails keeps the old secret and says so once."""

from __future__ import annotations

import asyncio
import contextlib

from structlog.testing import capture_logs

from gateway.secret_pickup import SecretPickup, SecretUser, fingerprint
from gateway.security.secret import Secret
from tests.conftest import eventually


async def test_a_secret_replaced_in_the_vault_is_handed_over_once(vault):
    vault.set("exchange", Secret("first"))
    handed: list[str] = []
    user = SecretUser("source exchange", lambda: vault.get("exchange").reveal(), handed.append, "first")
    pickup = SecretPickup([user], vault.path, every=0.05)
    task = asyncio.get_running_loop().create_task(pickup.run())
    try:
        with capture_logs() as logs:
            # The first look reads every secret (one changed while the gateway started would be used).
            await eventually(lambda: [e for e in logs if e.get("why") == "start"], what="the first look")
            vault.set("other", Secret("unrelated"))  # the file changed, this secret did not: nothing handed over
            await eventually(lambda: [e for e in logs if e.get("why") == "vault_changed"], what="a re-read")
            assert handed == []
            vault.set("exchange", Secret("second"))
            await eventually(lambda: handed == ["second"], what="the new secret handed over")
            pickup.wake()  # SIGHUP: read again now, whatever the file says
            await eventually(lambda: [e for e in logs if e.get("why") == "signal"], what="the wake")
        assert handed == ["second"]
        assert [e["user"] for e in logs if e["event"] == "credentials.picked_up"] == ["source exchange"]
        assert not any("second" in str(e) for e in logs)  # never the value
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_read_that_fails_keeps_the_old_secret_and_is_told_once():
    def broken() -> str:
        raise OSError("the vault key file is unreadable")

    handed: list[str] = []
    user = SecretUser("source exchange", broken, handed.append, "old")
    with capture_logs() as logs:
        assert await user.refresh() is False
        assert await user.refresh() is False
    assert handed == [] and user.current == "old"
    assert len([e for e in logs if e["event"] == "credentials.reread_failed"]) == 1


def test_the_fingerprint_changes_with_a_rewrite_and_is_none_without_a_file(tmp_path):
    path = tmp_path / "credentials.vault"
    assert fingerprint(path) is None and fingerprint(None) is None
    path.write_text("a")
    before = fingerprint(path)
    (tmp_path / "new").write_text("b")
    (tmp_path / "new").replace(path)  # how the vault writes: a new file renamed over the old one
    assert fingerprint(path) != before
