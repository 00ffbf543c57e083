"""The gateway's own commands as an admin runs them: credentials, sync-once, rooms, run — in subprocesses,
against a simulator on a real socket."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD
from tests.conftest import free_port
from tests.gateway_cli import ENV, ROOT, gateway, write_config


def test_credentials_sync_once_rooms_and_run(ews, tmp_path):  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = write_config(tmp_path, ews.url, ["room1@contoso.com", "room2@contoso.com", "alice@contoso.com"], port)

    stored = gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin", stdin=SERVICE_PASSWORD)
    assert stored.returncode == 0, stored.stderr
    assert SERVICE_PASSWORD not in stored.stdout + stored.stderr
    assert SERVICE_PASSWORD.encode() not in (tmp_path / "data" / "credentials.vault").read_bytes()

    once = gateway("sync-once", "room1@contoso.com", "--config", str(cfg))
    assert once.returncode == 0, once.stderr
    assert once.stdout.startswith("room1@contoso.com: verified;")
    denied = gateway("sync-once", "alice@contoso.com", "--config", str(cfg))
    assert denied.returncode == 1 and "impersonation_denied" in denied.stderr

    listing = gateway("rooms", "--config", str(cfg))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert rows["room1@contoso.com"] == "verified" and rows["room2@contoso.com"] == "pending"
    assert listing.stdout.split()[3] == "SOURCE" and listing.stdout.splitlines()[1].split()[3] == "exchange"

    created = gateway("api-keys", "create", "room display", "--scope", "read", "--config", str(cfg))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert "Authorization: Bearer" in created.stderr and key not in created.stderr
    keys = gateway("api-keys", "list", "--config", str(cfg))
    assert keys.returncode == 0 and "room display" in keys.stdout and key.split("_", 2)[2] not in keys.stdout

    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(cfg)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rooms_url = f"http://127.0.0.1:{port}/v1/rooms"
    try:
        deadline = time.monotonic() + 60
        states: dict[str, str] = {}
        expected = {"room1@contoso.com": "verified", "room2@contoso.com": "verified",
                    "alice@contoso.com": "impersonation_denied"}
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(rooms_url, headers={"Authorization": f"Bearer {key}"})
                with urllib.request.urlopen(request, timeout=2) as resp:
                    states = {r["email"]: r["state"] for r in json.load(resp)["rooms"]}
            except OSError:
                pass
            if states == expected:  # every room starts pending; its worker verifies it, in no set order
                break
            time.sleep(0.2)
        assert states == expected, states
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            assert json.load(resp)["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rooms_url, timeout=2)
        assert refused.value.code == 401 and "gateway api-keys create" in json.load(refused.value)["message"]
        revoked = gateway("api-keys", "revoke", key.split("_")[1], "--config", str(cfg))
        assert revoked.returncode == 0, revoked.stderr
        request = urllib.request.Request(rooms_url, headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the running gateway learns of the revocation within seconds
            try:
                urllib.request.urlopen(request, timeout=2).close()
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the revoked key was still accepted")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            raise AssertionError(err[-6000:]) from None
    assert proc.returncode == 0, err[-2000:]
    assert SERVICE_PASSWORD not in err and key.split("_", 2)[2] not in err
    assert '"event": "api.auth_refused"' in err  # the refusals are logged, with the key id only
    assert '"event": "gateway.stopped"' in err


def test_a_broken_configuration_is_reported_whole_with_locations(tmp_path):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("exchange:\n  ews_url: http://mail.contoso.com/EWS/Exchange.asmx\n  password: hunter2\n"
                   "rooms:\n  mailboxs: [room1@contoso.com]\n")
    result = gateway("run", "--config", str(cfg))
    assert result.returncode == 2
    assert "exchange.ews_url" in result.stderr and "rooms.mailboxs" in result.stderr
    assert "gateway credentials set" in result.stderr and "hunter2" not in result.stderr


def test_doctor_names_each_problem_with_its_key_and_turns_green(ews, tmp_path):  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path, ews.url, ["room1@contoso.com", "nobody@contoso.com", "alice@contoso.com"],
                       free_port())
    no_password = gateway("doctor", "--config", str(cfg))
    assert no_password.returncode == 1 and "FAIL" in no_password.stdout
    # Every remedy that names a command names the file in use, so it can be copied as it is.
    assert f"`gateway credentials set exchange --config {cfg}`" in no_password.stdout, no_password.stdout
    assert f"run `gateway doctor --config {cfg}` again" in no_password.stdout

    assert gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin",
                   stdin=SERVICE_PASSWORD).returncode == 0
    report = gateway("doctor", "--config", str(cfg))
    assert report.returncode == 1
    rooms = {ln.split()[2]: ln for ln in report.stdout.splitlines() if ln.split()[1:2] == ["room"]}
    assert rooms["room1@contoso.com"].startswith("ok")
    assert rooms["nobody@contoso.com"].startswith("FAIL") and "mailbox_not_found" in rooms["nobody@contoso.com"]
    assert "impersonation_denied" in rooms["alice@contoso.com"]
    assert "ApplicationImpersonation" in rooms["alice@contoso.com"]

    good = write_config(tmp_path, ews.url, ["room1@contoso.com", "room2@contoso.com"], free_port())
    green = gateway("doctor", "--config", str(good))
    assert green.returncode == 0, green.stdout + green.stderr
    assert green.stdout.strip().endswith("all green")


def doctor_rows(out: str) -> dict[str, tuple[str, str, str]]:
    """The report's check lines by what they checked: (mark, key, text)."""
    rows = {}
    for line in out.splitlines():
        mark = line[:4].strip()
        if mark in ("ok", "warn", "FAIL", "skip"):
            head, _, text = line[6:].partition("  -> ")
            what, _, key = head.rstrip().rpartition(" ")
            rows[what.strip()] = (mark, key, text)
    return rows


def test_doctor_with_a_wrong_password_makes_one_failed_logon_and_checks_no_room(ews, tmp_path):  # type: ignore[no-untyped-def]
    rooms = [f"room{i}@contoso.com" for i in range(1, 6)]
    lists = tuple(ews.org.room_lists)
    cfg = write_config(tmp_path, ews.url, rooms, free_port(), room_lists=lists)
    assert gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin",
                   stdin="Not-the-password-1!").returncode == 0
    report = gateway("doctor", "--config", str(cfg))
    assert report.returncode == 1
    # One logon, on its own, before any room: each failed logon counts towards the account's lockout threshold.
    assert ews.call(lambda: ews.sim.failed_logons) == 1
    rows = doctor_rows(report.stdout)
    failed = {what: row for what, row in rows.items() if row[0] == "FAIL"}
    assert list(failed) == [f"Exchange {ews.url} as CONTOSO\\{SERVICE_ACCOUNT}"], report.stdout
    _, key, text = next(iter(failed.values()))
    assert key == "invalid_auth" and "refused the service account's credentials" in text
    assert f"`gateway credentials set exchange --config {cfg}`" in text
    assert rows[f"rooms and room lists ({len(rooms) + len(lists)})"][:2] == ("skip", "not_checked")
    assert not [what for what in rows if what.startswith(("room ", "room list"))], report.stdout
    assert report.stdout.strip().endswith(f"run `gateway doctor --config {cfg}` again")


def test_doctor_exercises_what_the_gateway_will_use(ews, tmp_path):  # type: ignore[no-untyped-def]
    """The mailbox and its type, a SyncFolderItems, a subscription of the configured kind and availability: a
    feed or an availability that cannot work is red before the gateway runs, in one line for all rooms."""
    rooms = ["room1@contoso.com", "room2@contoso.com", "alice@contoso.com"]
    # An account that may impersonate everyone, so that a person's mailbox passes every right check.
    cfg = write_config(tmp_path, ews.url, [*rooms, "nobody@contoso.com"], free_port(), account=ORGANIZER_ACCOUNT)
    assert gateway("credentials", "set", "exchange", "--config", str(cfg), "--stdin",
                   stdin=SERVICE_PASSWORD).returncode == 0
    before = ews.call(lambda: dict(ews.sim.calls))
    report = gateway("doctor", "--config", str(cfg))
    rows = doctor_rows(report.stdout)
    assert report.returncode == 1, report.stdout
    assert rows["room room1@contoso.com"][:2] == rows["room room2@contoso.com"][:2] == ("ok", "ok")
    assert rows["room nobody@contoso.com"][:2] == ("FAIL", "mailbox_not_found")  # a SOAP fault, not a connection
    mark, key, text = rows["room alice@contoso.com"]
    assert (mark, key) == ("warn", "not_a_room") and "person's mailbox (Alice" in text
    calls = ews.call(lambda: dict(ews.sim.calls))
    for operation in ("SyncFolderItems", "Subscribe", "Unsubscribe", "GetUserAvailabilityRequest", "ResolveNames"):
        assert calls.get((operation, "NoError"), 0) > before.get((operation, "NoError"), 0), operation

    cfg = write_config(tmp_path, ews.url, rooms, free_port(), account=ORGANIZER_ACCOUNT)
    green = gateway("doctor", "--config", str(cfg))
    assert green.returncode == 0 and green.stdout.strip().endswith("no check failed (1 warning above): all green")

    # A server whose SubscribeResponse has no SubscriptionId: the streaming feed cannot work, for any room.
    ews.call(lambda: ews.sim.faults.omit.update({"Subscribe": {"SubscriptionId"}}))
    broken = doctor_rows(gateway("doctor", "--config", str(cfg)).stdout)
    mark, key, text = broken["rooms (all 3)"]
    assert (mark, key) == ("FAIL", "unexpected_answer") and text.startswith("streaming subscription: ")
    assert not [what for what in broken if what.startswith("room ") and broken[what][0] == "FAIL"], broken
    # The same in pull mode (a SubscribeResponse without a watermark).
    pull = write_config(tmp_path, ews.url, rooms, free_port(), account=ORGANIZER_ACCOUNT, mode="pull",
                        name="pull.yaml")
    ews.call(lambda: (ews.sim.faults.clear(), ews.sim.faults.omit.update({"Subscribe": {"Watermark"}})))
    broken = doctor_rows(gateway("doctor", "--config", str(pull)).stdout)
    assert broken["rooms (all 3)"][:2] == ("FAIL", "unexpected_answer")
    assert broken["rooms (all 3)"][2].startswith("pull subscription: ")

    # A server that refuses GetUserAvailability: the availability the commands use cannot work.
    ews.call(lambda: (ews.sim.faults.clear(),
                      ews.sim.faults.refuse.update({"GetUserAvailabilityRequest": "ErrorInvalidOperation"})))
    broken = doctor_rows(gateway("doctor", "--config", str(cfg)).stdout)
    mark, key, text = broken["rooms (all 3)"]
    assert mark == "FAIL" and text.startswith("availability: ") and "ErrorInvalidOperation" in text, broken
    # With the rooms-scoped account the person's mailbox fails earlier, on its own line; the two rooms that share
    # the availability failure are still one line.
    scoped = write_config(tmp_path, ews.url, rooms, free_port(), name="scoped.yaml")
    broken = doctor_rows(gateway("doctor", "--config", str(scoped)).stdout)
    assert broken["room alice@contoso.com"][:2] == ("FAIL", "impersonation_denied")
    mark, key, text = broken["rooms (2 of 3)"]
    assert mark == "FAIL" and text.startswith("room1@contoso.com, room2@contoso.com: availability: "), broken
    assert "room room1@contoso.com" not in broken and "room room2@contoso.com" not in broken


# -- messages and help -----------------------------------------------------------------------------------------
def test_run_without_config_says_that_none_was_given(tmp_path):  # type: ignore[no-untyped-def]
    env = {k: v for k, v in ENV.items() if k != "GATEWAY_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "gateway", "run"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    notice = json.loads(next(line for line in result.stderr.splitlines() if "config.not_given" in line))
    assert notice["message"].startswith("no --config given and $GATEWAY_CONFIG is not set")
    assert notice["remedy"].startswith("pass --config PATH")
    with_config = gateway("run", "--config", str(tmp_path / "missing.yaml"))
    assert "config.not_given" not in with_config.stderr


@pytest.mark.parametrize(("host", "key", "says"), [
    ("127.0.0.1", "port_in_use", "another program already listens on port"),
    ("192.0.2.1", "listen_address_unavailable", "192.0.2.1 is not an address of this machine"),
    ("no-such-host.invalid", "unknown_listen_host", "there is no host 'no-such-host.invalid'"),
])
async def test_a_listen_failure_names_the_cause_and_the_setting_that_fixes_it(host, key, says):  # type: ignore[no-untyped-def]
    from aiohttp import web

    from gateway.errors import GatewayError
    from gateway.service import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayError) as err:
            await serve(web.Application(), host, port)
        assert err.value.key == key and says in str(err.value)
        assert "--port" not in str(err.value)
        assert ("api.port" if key == "port_in_use" else "api.host") in err.value.remedy
        with pytest.raises(GatewayError) as demo_err:  # the demo has a --port option and no host to set
            await serve(web.Application(), "127.0.0.1", port, settings=(None, "--port"))
        assert demo_err.value.key == "port_in_use" and "choose a free port with --port" in demo_err.value.remedy


def test_every_subcommand_help_reads_the_same_way(monkeypatch):  # type: ignore[no-untyped-def]
    from gateway.cli import _leaves, _parsers, build_parser

    monkeypatch.setenv("COLUMNS", "120")
    parser = build_parser()
    for p in _parsers(parser):
        text = p.format_help()
        assert p.description, f"{p.prog} has no description"
        assert max(len(line) for line in text.splitlines()) <= 120, f"{p.prog} --help has lines over 120 columns"
    leaves = list(_leaves(parser))
    run = next(p for p in leaves if p.prog == "gateway run")
    standard = {a.dest: a.help for a in run._actions}
    for leaf in leaves:
        options = {o: a for a in leaf._actions for o in a.option_strings}
        assert "--log-level" in options and "--log-format" in options, leaf.prog
        assert options["--log-format"].help == standard["log_format"], leaf.prog
        if "--config" in options:
            config = options["--config"]
            assert config.metavar == "PATH", leaf.prog
            assert "(default: $GATEWAY_CONFIG, else the built-in defaults and GATEWAY_* variables)" in str(config.help)


def test_api_keys_create_needs_only_the_store(tmp_path):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"""
exchange:
  ews_url: https://mail.contoso.com/EWS/Exchange.asmx
  username: 'CONTOSO\\svc'
  password_ref: env:NOT_SET_HERE
rooms:
  mailboxes: [room1@contoso.com]
store:
  path: {tmp_path / "data" / "gateway.sqlite"}
""")
    env = {k: v for k, v in ENV.items() if k != "NOT_SET_HERE"}
    created = subprocess.run([sys.executable, "-m", "gateway", "api-keys", "create", "display", "--scope", "read",
                              "--config", str(cfg)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("gwk_") and "NOT_SET_HERE" not in created.stderr
