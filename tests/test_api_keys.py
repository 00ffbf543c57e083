"""Local API keys on a real SQLite file: created once, stored as a hash, verified cheaply, listed without secrets,
revoked (at once here, within the cache bound elsewhere); and `gateway api-keys` as an admin runs it."""

from __future__ import annotations

import argparse
import hashlib
import io
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import apikeys as cli
from gateway.errors import ConfigError
from gateway.store.apikeys import CACHE_SECONDS, TOUCH_SECONDS, ApiKeys, key_id_of
from gateway.store.sqlite import SqliteStore


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "g.sqlite")
    yield s
    s.close()


def secret_of(token: str) -> str:
    return token.split("_", 2)[2]


def test_a_created_key_verifies_with_its_scopes_and_only_a_hash_is_stored(store, tmp_path):
    keys = ApiKeys(store)
    token = keys.create("lobby display", ["read", "metrics"])
    assert token.startswith("gwk_") and len(secret_of(token)) == 43

    key = keys.verify(token)
    assert key is not None and key.id == key_id_of(token)
    assert key.name == "lobby display" and key.scopes == {"read", "metrics"}

    with sqlite3.connect(tmp_path / "g.sqlite") as raw:
        row = raw.execute("SELECT secret_hash, scopes FROM api_keys WHERE id = ?", (key.id,)).fetchone()
    assert row == (hashlib.sha256(secret_of(token).encode()).hexdigest(), "read,metrics")
    store.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.sqlite"))
    assert secret_of(token).encode() not in data


def test_wrong_malformed_and_unknown_keys_are_refused_even_when_the_real_key_is_cached(store):
    keys = ApiKeys(store)
    token = keys.create("display", ["read"])
    assert keys.verify(token) is not None  # cached now
    key_id, secret = key_id_of(token), secret_of(token)
    wrong = f"gwk_{key_id}_{'A' * 43}"
    assert keys.verify(wrong) is None
    assert keys.check(wrong) is not None and keys.check(wrong).reason == "unknown"  # type: ignore[union-attr]
    assert keys.verify(f"gwk_{'0' * 16}_{secret}") is None  # the right secret under another id
    for junk in ("", "gwk_", "Bearer " + token, token + "x", token[:-1], token.replace("gwk_", "gwx_"), secret):
        verdict = keys.check(junk)
        assert verdict is not None and verdict.key is None, junk


def test_the_cache_answers_without_the_store_only_for_keys_it_has_seen(store):
    keys = ApiKeys(store)
    token = keys.create("display", ["read"])
    assert keys.check(token, load=False) is None  # not looked up yet: the caller must read off the event loop
    assert keys.verify(token) is not None
    cached = keys.check(token, load=False)
    assert cached is not None and cached.key is not None and cached.key.name == "display"


def test_revoked_here_is_refused_at_once_and_elsewhere_within_the_cache_bound(store, tmp_path):
    ticks = Ticks()
    api_side = ApiKeys(store, monotonic=ticks)
    token = api_side.create("booking system", ["read", "book"])
    assert api_side.verify(token) is not None

    # `gateway api-keys revoke` is another process with its own connection to the same file.
    admin_store = SqliteStore(tmp_path / "g.sqlite")
    try:
        assert ApiKeys(admin_store).revoke(key_id_of(token) or "")
    finally:
        admin_store.close()
    ticks.now += CACHE_SECONDS / 2
    assert api_side.verify(token) is not None  # still within the documented bound
    ticks.now += CACHE_SECONDS
    verdict = api_side.check(token)
    assert verdict is not None and verdict.key is None and verdict.reason == "revoked"

    other = api_side.create("display", ["read"])
    assert api_side.verify(other) is not None
    assert api_side.revoke(key_id_of(other) or "")
    assert api_side.verify(other) is None  # revoked through the same object: no delay at all
    assert api_side.revoke(key_id_of(other) or "")  # idempotent
    assert not api_side.revoke("0123456789abcdef")


def test_list_shows_everything_but_secrets(store):
    now = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
    keys = ApiKeys(store, now=lambda: now)
    first = keys.create("lobby", ["read"])
    now += timedelta(minutes=5)
    second = keys.create("crm", ["read", "book"])
    keys.revoke(key_id_of(first) or "")

    listed = keys.list()
    assert [(k.id, k.name, k.scopes) for k in listed] == [(key_id_of(first), "lobby", ("read",)),
                                                          (key_id_of(second), "crm", ("read", "book"))]
    assert listed[0].created_at == now - timedelta(minutes=5) and listed[0].revoked_at == now
    assert listed[1].revoked_at is None and listed[1].last_used_at is None
    text = repr(listed)
    assert secret_of(first) not in text and secret_of(second) not in text


def test_last_used_is_written_at_most_once_a_minute(store):
    ticks = Ticks()
    now = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    keys = ApiKeys(store, now=lambda: now, monotonic=ticks)
    token = keys.create("display", ["read"])
    key_id = key_id_of(token) or ""

    assert keys.use_due(key_id)
    keys.record_use(key_id)
    assert keys.list()[0].last_used_at == now
    ticks.now += TOUCH_SECONDS - 1
    assert not keys.use_due(key_id)
    ticks.now += 2
    assert keys.use_due(key_id)


@pytest.mark.parametrize(("name", "scopes", "error"), [
    ("display", [], "invalid_scope"),
    ("display", ["read", "admin"], "invalid_scope"),
    ("", ["read"], "invalid_api_key_name"),
    ("x" * 65, ["read"], "invalid_api_key_name"),
    ("evil\nname", ["read"], "invalid_api_key_name"),
])
def test_create_refuses_bad_names_and_scopes(store, name, scopes, error):
    with pytest.raises(ConfigError) as caught:
        ApiKeys(store).create(name, scopes)
    assert caught.value.key == error and caught.value.remedy
    assert ApiKeys(store).list() == []


# -- gateway api-keys ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway")
    cli.register_cli(p.add_subparsers(dest="command"))
    return p


def write_config(tmp: Path) -> Path:
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"""
exchange:
  ews_url: https://mail.contoso.com/EWS/Exchange.asmx
  username: 'CONTOSO\\svc-gateway'
  password_ref: vault:exchange
rooms:
  mailboxes: [room1@contoso.com]
store:
  path: {tmp / "data" / "gateway.sqlite"}
api:
  port: 8099
""")
    return cfg


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_cli(parser().parse_args(argv), env={}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_creates_lists_and_revokes_keys_without_ever_printing_a_secret_again(tmp_path):
    cfg = str(write_config(tmp_path))
    code, out, err = run("api-keys", "list", "--config", cfg)
    assert code == 0 and out == "" and "gateway api-keys create" in err

    code, out, err = run("api-keys", "create", "lobby display", "--scope", "read", "--config", cfg)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.startswith("gwk_")  # the key alone on stdout: KEY=$(...) works
    assert "Authorization: Bearer" in err and "http://127.0.0.1:8099/v1/rooms" in err and token not in err
    code, out, err = run("api-keys", "create", "crm", "--scope", "read", "--scope", "book", "--config", cfg)
    crm = out.strip()

    store = SqliteStore(tmp_path / "data" / "gateway.sqlite")
    try:
        key = ApiKeys(store).verify(token)
        assert key is not None and key.scopes == {"read"}
    finally:
        store.close()

    code, listing, err = run("api-keys", "list", "--config", cfg)
    assert code == 0, err
    header, *rows = listing.splitlines()
    assert header.split() == ["ID", "NAME", "SCOPES", "CREATED", "LAST", "USED", "REVOKED"]
    first, second = (r.split() for r in rows)
    assert first[:4] == [key_id_of(token), "lobby", "display", "read"] and first[5:] == ["-", "-"]
    assert second[:3] == [key_id_of(crm), "crm", "read,book"] and second[4:] == ["-", "-"]
    created = datetime.fromisoformat(first[4].replace("Z", "+00:00"))
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=5)
    for secret in (secret_of(token), secret_of(crm)):
        assert secret not in listing + err

    code, out, err = run("api-keys", "revoke", key_id_of(token) or "", "--config", cfg)
    assert code == 0 and "revoked API key" in out and f"{CACHE_SECONDS:g} seconds" in out
    code, out, _ = run("api-keys", "revoke", key_id_of(token) or "", "--config", cfg)
    assert code == 0 and "already revoked" in out
    code, listing, _ = run("api-keys", "list", "--config", cfg)
    assert not listing.splitlines()[1].rstrip().endswith("-")  # the revoked date is shown
    code, _, err = run("api-keys", "revoke", "0123456789abcdef", "--config", cfg)
    assert code == 1 and "api-keys list" in err


def test_cli_refuses_an_unknown_scope_and_a_missing_one(tmp_path, capsys):
    cfg = str(write_config(tmp_path))
    for argv in (("api-keys", "create", "x", "--scope", "admin", "--config", cfg),
                 ("api-keys", "create", "x", "--config", cfg)):
        with pytest.raises(SystemExit) as exited:
            parser().parse_args(argv)
        assert exited.value.code == 2
    assert "--scope" in capsys.readouterr().err
    code, _, err = run("api-keys", "create", "bad\tname", "--scope", "read", "--config", cfg)
    assert code == 2 and "invalid_api_key_name" not in err and "not a valid API key name" in err
