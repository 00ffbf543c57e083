"""The credential vault, the Secret type, and the `gateway credentials` commands."""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import logging
import os
import pickle
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from gateway import credentials
from gateway.config import SecretRef, VaultConfig, load_config
from gateway.errors import ConfigError
from gateway.observability.logging import configure_logging
from gateway.security import Secret, Vault, generate_key_file, new_key_text, parse_key, read_key_file

PASSWORD = "S3cret-pässword!"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return generate_key_file(tmp_path / "secrets" / "vault.key")


@pytest.fixture
def vault(tmp_path: Path, key_file: Path) -> Vault:
    return Vault(tmp_path / "data" / "credentials.vault", read_key_file(key_file))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the vault -------------------------------------------------------------------------------------------------
def test_round_trip_of_named_entries(vault, key_file):
    assert vault.names() == [] and not vault.exists()
    vault.set("exchange", Secret(PASSWORD))
    vault.set("graph", "client-secret-value")
    again = Vault(vault.path, read_key_file(key_file))
    assert again.names() == ["exchange", "graph"] and "exchange" in again and "ldap" not in again
    assert again.get("exchange").reveal() == PASSWORD
    assert again.entries()[0].name == "exchange" and again.entries()[0].updated_at.endswith("Z")
    vault.set("exchange", "rotated")
    assert again.get("exchange").reveal() == "rotated"
    assert again.delete("graph") and not again.delete("graph")
    assert again.names() == ["exchange"]


def test_nothing_readable_is_stored_in_the_file(vault):
    vault.set("boardroom-panel", PASSWORD)
    raw = vault.path.read_bytes()
    assert PASSWORD.encode() not in raw and b"boardroom-panel" not in raw  # names are confidential too
    doc = json.loads(raw)
    assert doc["format"] == "exchange-room-gateway/vault" and doc["cipher"] == "AES-256-GCM"


def test_vault_and_key_files_are_private(vault, key_file):
    vault.set("exchange", PASSWORD)
    assert mode(vault.path) == 0o600 and mode(key_file) == 0o600
    vault.set("exchange", "again")  # a rewrite keeps it private
    assert mode(vault.path) == 0o600


def test_an_existing_key_file_is_never_overwritten(key_file):
    before = key_file.read_text()
    with pytest.raises(ConfigError, match="already exists") as err:
        generate_key_file(key_file)
    assert err.value.key == "vault_key_exists" and key_file.read_text() == before


def test_a_missing_entry_names_the_command_that_stores_it(vault):
    with pytest.raises(ConfigError) as err:
        vault.get("exchange")
    assert err.value.key == "credential_missing" and "gateway credentials set exchange" in str(err.value)
    vault.set("graph", "x")
    with pytest.raises(ConfigError, match=r"has no entry 'exchange'.*gateway credentials set exchange"):
        vault.get("exchange")


def test_a_wrong_key_is_told_apart_from_tampering_and_names_the_fix(vault, tmp_path):
    vault.set("exchange", PASSWORD)
    other = generate_key_file(tmp_path / "other.key")
    with pytest.raises(ConfigError) as err:
        Vault(vault.path, read_key_file(other)).get("exchange")
    assert err.value.key == "vault_key_mismatch"
    assert f"key file {other}" in str(err.value) and "vault.key_file" in str(err.value)
    assert PASSWORD not in str(err.value)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "version", "cipher"])
def test_tampering_is_detected(vault, field):
    vault.set("exchange", PASSWORD)
    doc = json.loads(vault.path.read_bytes())
    if field in ("ciphertext", "nonce"):
        raw = bytearray(base64.b64decode(doc[field]))
        raw[len(raw) // 2] ^= 0x01
        doc[field] = base64.b64encode(bytes(raw)).decode()
    elif field == "version":
        doc["version"] = 2
    else:
        doc["cipher"] = "AES-128-GCM"  # the header is authenticated with the ciphertext
    vault.path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        vault.get("exchange")
    assert err.value.key in ("vault_tampered", "vault_version")
    assert "backup" in str(err.value) or "version" in str(err.value)


def test_a_truncated_or_foreign_file_is_reported_as_damaged(vault):
    vault.set("exchange", PASSWORD)
    vault.path.write_bytes(vault.path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="not a readable vault file") as err:
        vault.names()
    assert err.value.key == "vault_tampered"


def test_a_failed_write_leaves_the_old_vault_intact(vault, monkeypatch):
    vault.set("exchange", "old-password")
    before = vault.path.read_bytes()

    def crash(*_args):
        raise OSError(28, "No space left on device")

    for name in ("fsync", "replace"):  # after a partial temp file, and just before the rename
        with monkeypatch.context() as m:
            m.setattr(os, name, crash)
            with pytest.raises(ConfigError, match="previous vault is unchanged") as err:
                vault.set("exchange", "new-password")
        assert err.value.key == "vault_unwritable" and "new-password" not in str(err.value)
        assert vault.path.read_bytes() == before
        assert vault.get("exchange").reveal() == "old-password"
        assert sorted(p.name for p in vault.path.parent.iterdir() if not p.name.endswith(".lock")) == \
            ["credentials.vault"]  # no temporary file left behind


def test_a_write_that_dies_halfway_through_the_data_leaves_the_old_vault(vault, monkeypatch):
    vault.set("exchange", "old-password")
    before = vault.path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            raise OSError(5, "Input/output error")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: HalfWriter(real_fdopen(fd, *a, **kw)))
    with pytest.raises(ConfigError):
        vault.set("exchange", "new-password")
    monkeypatch.undo()
    assert vault.path.read_bytes() == before and vault.get("exchange").reveal() == "old-password"


def test_concurrent_writers_lose_no_entry(vault):
    names = [f"room-panel-{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: vault.set(n, n), names))
    assert vault.names() == sorted(names)


def test_keys_are_validated_without_echoing_them():
    key = new_key_text()
    assert len(key) == 44 and parse_key(key, "test").key_id == parse_key(key, "test").key_id
    assert parse_key(key.rstrip("="), "test").material == parse_key(key, "test").material
    with pytest.raises(ConfigError) as err:
        parse_key("hunter2hunter2", "environment variable GATEWAY_VAULT_KEY")
    assert err.value.key == "vault_key_invalid" and "hunter2" not in str(err.value)
    assert "GATEWAY_VAULT_KEY" in str(err.value)
    assert "material" not in repr(parse_key(key, "test")) and key not in repr(parse_key(key, "test"))


def test_credential_names_are_checked(vault):
    with pytest.raises(ConfigError, match="not a valid credential name"):
        vault.set("../../etc/passwd", "x")


# -- Secret ----------------------------------------------------------------------------------------------------
def test_a_secret_never_shows_its_value():
    s = Secret(PASSWORD)
    percent = "%s %r" % (s, s)  # noqa: UP031 - how stdlib logging formats its arguments
    shown = [repr(s), str(s), f"{s}", f"{s!r}", f"{s:>30}", percent, repr([s]), repr({"password": s}),
             str(ValueError(s))]
    assert all(PASSWORD not in text for text in shown)
    assert repr(s) == str(s) == f"{s}" == "**********"
    assert s.reveal() == PASSWORD


def test_a_secret_cannot_be_pickled_or_changed():
    s = Secret(PASSWORD)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(AttributeError):
        s._value = "other"
    assert copy.deepcopy(s) is s and not hasattr(s, "__dict__")


def test_a_secret_in_a_log_event_is_masked():
    s = Secret(PASSWORD)
    with capture_logs() as logs:
        structlog.get_logger("t").info("auth.attempt", credential=s)
    assert logs[0]["credential"] is s and PASSWORD not in repr(logs)

    root_handlers = logging.getLogger().handlers[:]
    try:
        for fmt in ("json", "console"):
            out = io.StringIO()
            configure_logging("info", fmt, stream=out)
            structlog.get_logger("t").info("auth.attempt", credential=s, nested={"value": s}, listed=[s])
            logging.getLogger("stdlib").warning("connecting with %s", s)
            text = out.getvalue()
            assert "auth.attempt" in text and "connecting with **********" in text and PASSWORD not in text, fmt
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = root_handlers


# -- gateway credentials ---------------------------------------------------------------------------------------
class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def vault_config(tmp_path: Path, **kw: object) -> VaultConfig:
    return VaultConfig(path=tmp_path / "data" / "credentials.vault", key_file=tmp_path / "secrets" / "vault.key",
                       **kw)  # type: ignore[arg-type]


def test_set_from_stdin_creates_the_key_and_says_where(tmp_path):
    cfg = vault_config(tmp_path)
    out, notices = io.StringIO(), io.StringIO()
    code = credentials.set_credential(cfg, "exchange", from_stdin=True, stdin=io.StringIO(PASSWORD + "\n"),
                                      out=out, notices=notices, env={})
    assert code == 0
    assert f"created a new vault key at {cfg.key_file.resolve()} (mode 0600)" in notices.getvalue()
    assert mode(cfg.key_file) == 0o600 and mode(cfg.path) == 0o600
    assert "stored 'exchange'" in out.getvalue() and PASSWORD not in out.getvalue() + notices.getvalue()
    assert credentials.open_vault(cfg, {}).get("exchange").reveal() == PASSWORD  # the newline was removed

    notices = io.StringIO()  # the second time the key exists: nothing is created
    credentials.set_credential(cfg, "graph", from_stdin=True, stdin=io.StringIO("x"), out=io.StringIO(),
                               notices=notices, env={})
    assert notices.getvalue() == ""


def test_set_prompts_twice_without_echo_on_a_terminal(tmp_path):
    cfg = vault_config(tmp_path)
    answers = iter([PASSWORD, PASSWORD])
    prompts: list[str] = []

    def prompt(text: str) -> str:
        prompts.append(text)
        return next(answers)

    credentials.set_credential(cfg, "exchange", stdin=FakeTTY(), out=io.StringIO(), notices=io.StringIO(),
                               prompt=prompt, env={})
    assert len(prompts) == 2 and credentials.open_vault(cfg, {}).get("exchange").reveal() == PASSWORD

    answers = iter(["one", "two"])
    with pytest.raises(ConfigError, match="differ; nothing was stored"):
        credentials.set_credential(cfg, "exchange", stdin=FakeTTY(), prompt=lambda _: next(answers), env={})
    assert credentials.open_vault(cfg, {}).get("exchange").reveal() == PASSWORD


def test_set_without_a_terminal_asks_for_stdin(tmp_path):
    with pytest.raises(ConfigError, match="not a terminal") as err:
        credentials.set_credential(vault_config(tmp_path), "exchange", stdin=io.StringIO(PASSWORD), env={},
                                   notices=io.StringIO())
    assert "--stdin" in str(err.value)


def test_a_vault_whose_key_is_gone_gets_no_new_key(tmp_path):
    cfg = vault_config(tmp_path)
    credentials.set_credential(cfg, "exchange", from_stdin=True, stdin=io.StringIO("x"), out=io.StringIO(),
                               notices=io.StringIO(), env={})
    cfg.key_file.unlink()
    with pytest.raises(ConfigError, match="exists but its key file") as err:
        credentials.set_credential(cfg, "exchange", from_stdin=True, stdin=io.StringIO("y"), env={})
    assert err.value.key == "vault_key_missing" and not cfg.key_file.exists()


def test_the_key_can_come_from_an_environment_variable(tmp_path):
    env = {"GATEWAY_VAULT_KEY": new_key_text()}
    cfg = vault_config(tmp_path, key_env="GATEWAY_VAULT_KEY")
    credentials.set_credential(cfg, "exchange", from_stdin=True, stdin=io.StringIO(PASSWORD), out=io.StringIO(),
                               notices=io.StringIO(), env=env)
    assert not cfg.key_file.exists()
    assert credentials.open_vault(cfg, env).get("exchange").reveal() == PASSWORD
    with pytest.raises(ConfigError, match=r"GATEWAY_VAULT_KEY .* is not set"):
        credentials.open_vault(cfg, {})


def test_list_shows_names_never_values(tmp_path):
    cfg = vault_config(tmp_path)
    out = io.StringIO()
    assert credentials.list_credentials(cfg, out=out, notices=io.StringIO(), env={}) == 0 and out.getvalue() == ""
    for name in ("exchange", "graph"):
        credentials.set_credential(cfg, name, from_stdin=True, stdin=io.StringIO(PASSWORD), out=io.StringIO(),
                                   notices=io.StringIO(), env={})
    credentials.list_credentials(cfg, out=out, env={})
    assert [line.split("\t")[0] for line in out.getvalue().splitlines()] == ["exchange", "graph"]
    assert PASSWORD not in out.getvalue()


def test_resolve_password_follows_the_reference(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(f"""\
exchange:
  ews_url: https://mail.contoso.com/EWS/Exchange.asmx
  username: CONTOSO\\svc
rooms:
  mailboxes: [room1@contoso.com]
vault:
  path: {tmp_path}/data/credentials.vault
  key_file: {tmp_path}/secrets/vault.key
""")
    config = load_config(path, env={})
    with pytest.raises(ConfigError, match="gateway credentials set exchange"):
        credentials.resolve_password(config, env={})
    credentials.set_credential(config.vault, "exchange", from_stdin=True, stdin=io.StringIO(PASSWORD),
                               out=io.StringIO(), notices=io.StringIO(), env={})
    secret = credentials.resolve_password(config, env={})
    assert isinstance(secret, Secret) and secret.reveal() == PASSWORD

    from_env = credentials.resolve_secret(SecretRef("env", "EXCHANGE_PASSWORD"), config.vault,
                                          {"EXCHANGE_PASSWORD": "from-env"})
    assert from_env.reveal() == "from-env"


def test_the_cli_wiring_parses_and_runs(tmp_path):
    parser = argparse.ArgumentParser(prog="gateway")
    credentials.register_cli(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "gateway.yaml").write_text(
        f"vault:\n  path: {tmp_path}/v.vault\n  key_file: {tmp_path}/v.key\nexchange: {{}}\n")
    base = ["credentials"]
    env = {"GATEWAY_CONFIG": str(tmp_path / "gateway.yaml")}
    assert not hasattr(parser.parse_args([*base, "list"]), "config")
    out, err = io.StringIO(), io.StringIO()
    args = parser.parse_args([*base, "set", "exchange", "--stdin", "--config", str(tmp_path / "gateway.yaml")])
    assert credentials.run_cli(args, env={}, stdin=io.StringIO(PASSWORD), stdout=out, stderr=err) == 0
    assert "created a new vault key" in err.getvalue() and "stored 'exchange'" in out.getvalue()
    out = io.StringIO()  # from here on the file is found through GATEWAY_CONFIG
    assert credentials.run_cli(parser.parse_args([*base, "list"]), env=env, stdout=out) == 0
    assert out.getvalue().startswith("exchange\t")
    assert credentials.run_cli(parser.parse_args([*base, "delete", "exchange"]), env=env, stdout=io.StringIO()) == 0
    err = io.StringIO()
    assert credentials.run_cli(parser.parse_args([*base, "delete", "exchange"]), env=env, stderr=err) == 1
    err = io.StringIO()
    assert credentials.run_cli(parser.parse_args([*base, "set", "bad/name", "--stdin"]), env=env,
                               stdin=io.StringIO("x"), stderr=err) == 2
    assert err.getvalue().startswith("error: 'bad/name' is not a valid credential name")
