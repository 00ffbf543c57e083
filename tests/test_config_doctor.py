"""`gateway doctor` checks what the configuration alone cannot: per-room privacy exceptions beside room lists,
once the lists are expanded from Exchange (the simulator, over HTTP with NTLM)."""

from __future__ import annotations

from pathlib import Path

from gateway import service
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD


def config(tmp_path: Path, url: str, privacy_rooms: list[str]) -> Path:
    path = tmp_path / "gateway.yaml"
    exceptions = "".join(f"      {room}: {{subject: drop}}\n" for room in privacy_rooms)
    path.write_text(f"""\
exchange:
  ews_url: {url}
  allow_insecure_http: true
  username: 'CONTOSO\\{SERVICE_ACCOUNT}'
  password_ref: env:GATEWAY_TEST_EXCHANGE_PASSWORD
rooms:
  room_lists: [rooms-hq@contoso.com]
  privacy:
    rooms:
{exceptions}store:
  path: {tmp_path / "gateway.sqlite"}
vault:
  path: {tmp_path / "credentials.vault"}
  key_file: {tmp_path / "vault.key"}
""")
    return path


async def test_doctor_fails_a_privacy_exception_for_a_room_that_no_room_list_holds(ews, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_EXCHANGE_PASSWORD", SERVICE_PASSWORD)
    assert await service.doctor(config(tmp_path, ews.url, ["room3@contoso.com", "room33@contoso.com"])) == 1
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if line.startswith("FAIL")]
    assert len(failed) == 1, out
    assert "rooms.privacy.rooms.room33@contoso.com" in failed[0] and "invalid_config" in failed[0]
    assert failed[0].endswith("did you mean 'room3@contoso.com'?")
    assert any(line.startswith("ok") and "room room3@contoso.com" in line for line in out)

    assert await service.doctor(config(tmp_path, ews.url, ["room3@contoso.com"])) == 0, capsys.readouterr().out
