"""The configuration: one YAML file, environment overrides, every problem reported at once with its place."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from gateway.cli import main
from gateway.config import (
    CommandsConfig,
    GraphSourceConfig,
    PrivacyPolicy,
    RelayConfig,
    SecretRef,
    SyncConfig,
    check_config,
    config_schema,
    load_config,
    load_vault_config,
    unknown_privacy_rooms,
)
from gateway.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "gateway.example.yaml"
SCHEMA = Path(__file__).resolve().parents[1] / "gateway" / "schemas" / "config.v1.json"

MINIMAL = """\
exchange:
  ews_url: https://mail.contoso.com/EWS/Exchange.asmx
  username: CONTOSO\\svc-gateway
rooms:
  mailboxes: [room1@contoso.com]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    config, problems = check_config(path, env or {})
    assert config is None and problems
    return [str(p) for p in problems]


def test_the_example_configuration_loads_with_the_documented_values():
    config = load_config(EXAMPLE, env={})
    ex = config.exchange
    assert ex.ews_url == "https://mail.contoso.com/EWS/Exchange.asmx" and not ex.allow_insecure_http
    assert ex.username == "CONTOSO\\svc-roomgateway" and ex.auth == "ntlm" and ex.version == "Exchange2013_SP1"
    assert ex.password_ref == SecretRef("vault", "exchange") and str(ex.password_ref) == "vault:exchange"
    assert ex.max_concurrent_requests <= 10 and ex.default_timezone == "Europe/Berlin"
    assert config.rooms.mailboxes == ("room1@contoso.com", "room2@contoso.com")
    assert (config.rooms.days_back, config.rooms.days_ahead) == (7, 365)
    assert config.sync.mode == "streaming" and config.sync.debounce_seconds == 2.0
    assert config.store.path == Path("data/gateway.sqlite")
    assert config.vault.key_file == Path("secrets/vault.key") and config.vault.key_env is None
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8088)
    assert config.source == EXAMPLE


def test_settings_are_frozen():
    config = load_config(EXAMPLE, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exchange.ews_url = "https://elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.rooms.privacy.rooms["x@contoso.com"] = PrivacyPolicy()  # type: ignore[index]


def test_defaults_fill_everything_not_given(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.exchange.password_ref == SecretRef("vault", "exchange")
    assert config.sync == SyncConfig()
    assert config.exchange.timeout_seconds == 60.0 and config.exchange.default_timezone == "UTC"
    assert config.rooms.privacy.for_room("room1@contoso.com") == PrivacyPolicy("keep", "Private", True)


def test_environment_overrides_win_and_are_typed(tmp_path):
    path = write(tmp_path, MINIMAL + "sync:\n  debounce_seconds: 2\n  group_size: 50\n")
    env = {
        "GATEWAY_EXCHANGE__EWS_URL": "https://ews.contoso.com/EWS/Exchange.asmx",
        "GATEWAY_SYNC__DEBOUNCE_SECONDS": "5",
        "GATEWAY_SYNC__GROUP_SIZE": "100",
        "GATEWAY_EXCHANGE__ALLOW_INSECURE_HTTP": "yes",
        "GATEWAY_ROOMS__MAILBOXES": "Room7@contoso.com, room8@contoso.com",
        "GATEWAY_ROOMS__PRIVACY__SUBJECT": "hash",
        "GATEWAY_STORE__PATH": "/var/lib/gateway/state.sqlite",
        "GATEWAY_LOG_FORMAT": "json",  # not a setting (no "__"): ignored
        "HOME": "/root",
    }
    config = load_config(path, env=env)
    assert config.exchange.ews_url == "https://ews.contoso.com/EWS/Exchange.asmx"
    assert config.sync.debounce_seconds == 5.0 and isinstance(config.sync.debounce_seconds, float)
    assert config.sync.group_size == 100 and isinstance(config.sync.group_size, int)
    assert config.exchange.allow_insecure_http is True
    assert config.rooms.mailboxes == ("room7@contoso.com", "room8@contoso.com")
    assert config.rooms.privacy.default.subject == "hash"
    assert config.store.path == Path("/var/lib/gateway/state.sqlite")


def test_configuration_from_the_environment_alone(tmp_path):
    env = {
        "GATEWAY_EXCHANGE__EWS_URL": "https://mail.contoso.com/EWS/Exchange.asmx",
        "GATEWAY_EXCHANGE__USERNAME": "svc@contoso.com",
        "GATEWAY_ROOMS__ROOM_LISTS": "allrooms@contoso.com",
    }
    config = load_config(None, env=env)
    assert config.source is None and config.rooms.room_lists == ("allrooms@contoso.com",)
    env["GATEWAY_CONFIG"] = str(write(tmp_path, MINIMAL))
    assert load_config(None, env=env).source == tmp_path / "gateway.yaml"


def test_every_problem_is_reported_at_once_with_its_place(tmp_path):
    path = write(tmp_path, """\
        exchange:
          ews_url: https://mail.contoso.com/EWS/Exchange.asmx
          username: svc-gateway
          version: Exchange2019
          max_concurrent_requests: 50
          default_timezone: W. Europe Standard Time
        rooms:
          mailboxes:
            - room1@contoso.com
            - room2.contoso.com
          days_ahead: "a year"
        sync:
          mode: push
        """)
    env = {"GATEWAY_SYNC__STREAMING_CONNECTION_TIMEOUT_MINUTES": "45", "GATEWAY_API__PORT": "eighty"}
    with pytest.raises(ConfigError) as err:
        load_config(path, env=env)
    text = str(err.value)
    assert "has 9 problems" in text
    expected = [
        f"{path}:3: exchange.username: must be DOMAIN\\user or user@domain",
        f"{path}:4: exchange.version: 'Exchange2019' is not one of",
        f"{path}:5: exchange.max_concurrent_requests: must be between 1 and 27, not 50",
        f"{path}:6: exchange.default_timezone: unknown time zone 'W. Europe Standard Time'; that is a Windows",
        f"{path}:10: rooms.mailboxes[1]: 'room2.contoso.com' is not an email address",
        f"{path}:11: rooms.days_ahead: must be a whole number, not text",
        f"{path}:13: sync.mode: 'push' is not one of streaming, pull, poll",
        "env GATEWAY_API__PORT: api.port: must be a whole number, not text",
    ]
    lines = [line.strip()[2:] for line in text.splitlines()[1:]]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert "use Exchange2016" in text and "Europe/Berlin" in text
    assert "env GATEWAY_SYNC__STREAMING_CONNECTION_TIMEOUT_MINUTES: sync.streaming_connection_timeout_minutes: " \
           "must be between 1 and 30, not 45" in text
    assert err.value.key == "invalid_config"


def test_problems_from_the_file_come_first_then_those_from_the_environment(tmp_path):
    path = write(tmp_path, MINIMAL + "api:\n  port: 0\n")
    problems = problems_of(path, {"GATEWAY_SYNC__MODE": "sometimes", "GATEWAY_VAULT__KEY_ENV": "VAULT_KEY"})
    assert problems == [
        f"{path}:7: api.port: must be between 1 and 65535, not 0",
        "env GATEWAY_SYNC__MODE: sync.mode: 'sometimes' is not one of streaming, pull, poll",
        "env GATEWAY_VAULT__KEY_ENV: vault.key_env: the environment variable VAULT_KEY is not set; "
        "set it to the vault key",
    ]


def test_a_password_in_the_file_is_refused_with_the_remedy_and_never_repeated(tmp_path):
    path = write(tmp_path, MINIMAL.replace("username:", "password: Hunter2-secret\n  username:"))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert f"{path}:3: exchange.password:" in text and "gateway credentials set exchange" in text
    assert "Hunter2-secret" not in text

    path = write(tmp_path, MINIMAL.replace("username:", "password_ref: Hunter2-secret\n  username:"))
    text = "\n".join(problems_of(path))
    assert "exchange.password_ref: must say where the password is kept" in text
    assert "gateway credentials set exchange" in text and "Hunter2-secret" not in text


def test_a_password_given_to_settings_built_in_code_is_refused_and_never_repeated():
    with pytest.raises(ValidationError) as err:
        RelayConfig(proxy_password_ref="Hunter2-secret")
    assert "must say where the password is kept" in str(err.value) and "Hunter2-secret" not in str(err.value)


def test_a_password_in_the_environment_is_refused_too(tmp_path):
    env = {"GATEWAY_EXCHANGE__PASSWORD": "Hunter2-secret", "GATEWAY_EXCHANGE__PASSWORD_REF": "Hunter2-secret"}
    text = "\n".join(problems_of(write(tmp_path, MINIMAL), env))
    assert "env GATEWAY_EXCHANGE__PASSWORD: exchange.password: a password or secret must not" in text
    assert "env GATEWAY_EXCHANGE__PASSWORD_REF: exchange.password_ref: must say where" in text
    assert "Hunter2-secret" not in text


def test_password_references_name_the_vault_or_an_environment_variable(tmp_path):
    path = write(tmp_path, MINIMAL.replace("username:", "password_ref: env:EXCHANGE_PASSWORD\n  username:"))
    config = load_config(path, env={"EXCHANGE_PASSWORD": "x"})
    assert config.exchange.password_ref == SecretRef("env", "EXCHANGE_PASSWORD")
    assert "EXCHANGE_PASSWORD, which is not set" in "\n".join(problems_of(path, {}))


def test_plain_http_is_refused_unless_explicitly_allowed_for_the_simulator(tmp_path):
    http = MINIMAL.replace("https://mail.contoso.com", "http://127.0.0.1:8080")
    text = "\n".join(problems_of(write(tmp_path, http)))
    assert f"{tmp_path / 'gateway.yaml'}:2: exchange.ews_url: uses http://" in text
    assert "use https://" in text and "allow_insecure_http" in text
    path = write(tmp_path, http.replace("rooms:", "  allow_insecure_http: true  # the local simulator\nrooms:"))
    config = load_config(path, env={})
    assert config.exchange.insecure and config.exchange.ews_url == "http://127.0.0.1:8080/EWS/Exchange.asmx"
    config = load_config(write(tmp_path, http), env={"GATEWAY_EXCHANGE__ALLOW_INSECURE_HTTP": "1"})
    assert config.exchange.insecure and config.exchange.ews_url == "http://127.0.0.1:8080/EWS/Exchange.asmx"


def test_unknown_settings_and_sections_are_reported_with_a_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL.replace("ews_url:", "ews_ulr: x\n  ews_url:") + """\
        synk:
          mode: pull
        rooms2: {}
        """.replace("        ", ""))
    problems = problems_of(path)
    assert f"{path}:2: exchange.ews_ulr: unknown setting; did you mean 'ews_url'?" in problems
    assert f"{path}:7: synk: unknown section; did you mean 'sync'?" in problems
    assert any(p.startswith(f"{path}:9: rooms2: unknown section") for p in problems)


def test_environment_typos_are_reported_not_ignored(tmp_path):
    env = {"GATEWAY_EXCHANGE_EWS_URL": "https://x", "GATEWAY_EXCHANGE__EWSURL": "https://x",
           "GATEWAY_SYNCH__MODE": "poll"}
    problems = problems_of(write(tmp_path, MINIMAL), env)
    assert ("env GATEWAY_EXCHANGE_EWS_URL: exchange.ews_url: ignored: write GATEWAY_EXCHANGE__EWS_URL "
            "(two underscores between section and setting)") in problems
    assert "env GATEWAY_EXCHANGE__EWSURL: exchange.ewsurl: unknown setting; did you mean 'ews_url'?" in problems
    assert "env GATEWAY_SYNCH__MODE: synch: unknown section; did you mean 'sync'?" in problems


def test_an_override_does_not_hide_a_section_the_file_got_wrong(tmp_path):
    path = write(tmp_path, MINIMAL + "api: [8080]\nsync:\n  group_size: 2024-01-01\n")
    assert problems_of(path, {"GATEWAY_API__PORT": "8090"}) == [
        f"{path}:6: api: must be a mapping of settings (indented `name: value` lines below it)",
        f"{path}:8: sync.group_size: must be a whole number, not a date"]


def test_duplicate_keys_are_reported_because_yaml_would_keep_the_last(tmp_path):
    path = write(tmp_path, MINIMAL + "  days_back: 3\n  days_back: 30\n")
    assert f"{path}:7: rooms.days_back: appears twice (first on line 6); YAML would silently keep only the last " \
           "one, so remove one" in problems_of(path)


def test_yaml_syntax_errors_point_at_the_line(tmp_path):
    path = write(tmp_path, MINIMAL + "sync:\n  mode: [streaming\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:8:") and "(syntax)" in problem


def test_a_missing_file_says_how_to_start(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "config/gateway.example.yaml" in problem


def test_required_settings_are_named_when_missing(tmp_path):
    problems = problems_of(write(tmp_path, "logging:\n  level: debug\n"))
    assert any("exchange.ews_url: required: the EWS endpoint" in p for p in problems)
    assert any("exchange.username: required: the service account" in p for p in problems)
    assert any("rooms.mailboxes: required: list the room mailboxes" in p for p in problems)


def test_per_room_privacy_inherits_the_default_policy(tmp_path):
    rooms = MINIMAL.replace("[room1@contoso.com]", "[room1@contoso.com, boardroom@contoso.com, lobby@contoso.com]")
    config = load_config(write(tmp_path, rooms + """\
          privacy:
            subject: hash
            rooms:
              BoardRoom@contoso.com:
                subject: drop
              lobby@contoso.com:
                hide_private_organizer: false
        """.replace("          ", "  ")), env={})
    privacy = config.rooms.privacy
    assert privacy.for_room("boardroom@contoso.com") == PrivacyPolicy("drop", "Private", True)
    assert privacy.for_room("lobby@contoso.com") == PrivacyPolicy("hash", "Private", False)
    assert privacy.for_room("room1@contoso.com") == PrivacyPolicy("hash", "Private", True)


def test_per_room_privacy_is_validated_too(tmp_path):
    privacy = "  privacy:\n    rooms:\n      boardroom@contoso.com:\n        subjct: drop\n"
    path = write(tmp_path, MINIMAL.replace("room1@", "boardroom@") + privacy)
    assert f"{path}:9: rooms.privacy.rooms.boardroom@contoso.com.subjct: unknown setting; did you mean " \
           "'subject'?" in problems_of(path)


def test_the_vault_section_loads_on_its_own_while_the_rest_is_unfinished(tmp_path):
    path = write(tmp_path, "exchange:\n  username: nobody\nvault:\n  key_file: /etc/gateway/vault.key\n")
    vault = load_vault_config(path, env={"GATEWAY_VAULT__PATH": "/var/lib/gateway/creds.vault"})
    assert vault.key_file == Path("/etc/gateway/vault.key") and vault.path == Path("/var/lib/gateway/creds.vault")
    with pytest.raises(ConfigError, match=r"vault\.key_fil: unknown setting"):
        load_vault_config(write(tmp_path, "vault:\n  key_fil: x\n"), env={})


def test_a_privacy_exception_for_a_room_that_is_not_configured_is_an_error_with_a_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL.replace("[room1@contoso.com]", "[room1@contoso.com, boardroom@contoso.com]") + """\
          privacy:
            rooms:
              BoardRom@contoso.com:
                subject: drop
              lobby@contoso.com:
                subject: hash
        """.replace("          ", "  "))
    problems = problems_of(path)
    assert [p.split(": ", 2)[:2] for p in problems] == [[f"{path}:8", "rooms.privacy.rooms.BoardRom@contoso.com"],
                                                        [f"{path}:10", "rooms.privacy.rooms.lobby@contoso.com"]]
    assert problems[0].endswith("is not a configured room, so this exception applies to nothing and the room it was "
                                "meant for keeps the default policy; did you mean 'boardroom@contoso.com'?")
    assert problems[1].endswith("the rooms are boardroom@contoso.com, room1@contoso.com")  # no look-alike to offer


def test_privacy_exceptions_beside_room_lists_wait_for_the_lists_to_be_expanded(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + """\
          room_lists: [allrooms@contoso.com]
          privacy:
            rooms:
              boardroom@contoso.com: {subject: drop}
              boardrom@contoso.com: {subject: drop}
        """.replace("          ", "  ")), env={})
    assert unknown_privacy_rooms(config.rooms.privacy, ["room1@contoso.com", "BoardRoom@contoso.com"]) == [
        ("boardrom@contoso.com", "is not a configured room, so this exception applies to nothing and the room it "
                                 "was meant for keeps the default policy; did you mean 'boardroom@contoso.com'?")]


def test_the_published_json_schema_is_the_one_the_models_generate(capsys):
    published = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert published == config_schema(), "regenerate it: gateway config-schema > gateway/schemas/config.v1.json"
    assert main(["config-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == published


def test_the_example_configuration_satisfies_the_schema_and_a_misspelt_key_does_not():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(example)
    example["exchange"]["ews_ulr"] = example["exchange"].pop("ews_url")
    example["sync"]["group_size"] = 500
    errors = sorted(e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(example))
    assert errors == ["500 is greater than the maximum of 200",
                      "Additional properties are not allowed ('ews_ulr' was unexpected)"]


def test_ranges_bound_the_file_while_settings_built_in_code_may_go_beyond_them(tmp_path):
    path = write(tmp_path, MINIMAL + "commands:\n  attendant_timeout_seconds: 0.1\n")
    assert problems_of(path) == [f"{path}:7: commands.attendant_timeout_seconds: must be between 1 and 600, not 0.1"]
    assert CommandsConfig(attendant_timeout_seconds=0.1).attendant_timeout_seconds == 0.1  # a test's short wait
    with pytest.raises(ValidationError):  # the types hold in code too
        CommandsConfig(attendant_timeout_seconds="soon")  # type: ignore[arg-type]


# -- calendar sources --------------------------------------------------------------------------------------------
SOURCES = """\
sources:
  - name: onprem
    kind: ews
    ews_url: https://mail.contoso.com/EWS/Exchange.asmx
    username: CONTOSO\\svc-gateway
    mailboxes: [room1@contoso.com, room2@contoso.com]
  - name: berlin
    kind: ews
    ews_url: https://mail.berlin.contoso.com/EWS/Exchange.asmx
    username: svc@berlin.contoso.com
    password_ref: env:BERLIN_PASSWORD
    room_lists: [allrooms@berlin.contoso.com]
"""


def test_sources_each_have_their_connection_credentials_and_rooms(tmp_path):
    config = load_config(write(tmp_path, SOURCES), env={"BERLIN_PASSWORD": "x"})
    onprem, berlin = config.calendar_sources
    assert (onprem.name, onprem.kind, onprem.mailboxes) == ("onprem", "ews", ("room1@contoso.com", "room2@contoso.com"))
    assert onprem.secret_ref == SecretRef("vault", "onprem")  # by default the vault entry named like the source
    assert berlin.secret_ref == SecretRef("env", "BERLIN_PASSWORD") and berlin.room_lists == (
        "allrooms@berlin.contoso.com",)
    assert berlin.ews_url == "https://mail.berlin.contoso.com/EWS/Exchange.asmx"
    assert config.exchange is None and [config.place_of(s) for s in (onprem, berlin)] == ["sources[0]", "sources[1]"]


def test_the_single_source_form_is_one_source_of_kind_ews_named_exchange(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "  room_lists: [all@contoso.com]\n"), env={})
    (source,) = config.calendar_sources
    assert (source.name, source.kind, config.place_of(source)) == ("exchange", "ews", "exchange")
    assert source.ews_url == config.exchange.ews_url and source.username == "CONTOSO\\svc-gateway"  # type: ignore[union-attr]
    assert source.mailboxes == ("room1@contoso.com",) and source.room_lists == ("all@contoso.com",)
    assert source.secret_ref == SecretRef("vault", "exchange")


def test_problems_in_a_source_keep_their_place_and_a_suggestion(tmp_path):
    text = SOURCES.replace("    kind: ews\n    ews_url: https://mail.berlin",
                           "    kind: ews\n    ews_ulr: https://mail.berlin")
    text = text.replace("name: onprem", "name: On-Prem")
    path = write(tmp_path, text.replace("    mailboxes: [room1@contoso.com, room2@contoso.com]\n",
                                        "    timeout_seconds: 900\n"))
    problems = problems_of(path, {"BERLIN_PASSWORD": "x"})
    assert problems[0].startswith(f"{path}:2: sources[0].name: 'on-prem' is not a source name; use a short name")
    assert problems[1:] == [
        f"{path}:2: sources[0].mailboxes: required: list the source's room mailboxes (or its room lists under "
        "room_lists)",
        f"{path}:6: sources[0].timeout_seconds: must be between 1 and 600, not 900",
        f"{path}:7: sources[1].ews_url: required: the EWS endpoint, e.g. https://mail.contoso.com/EWS/Exchange.asmx "
        "(or set autodiscover_email to find it through Autodiscover)",
        f"{path}:9: sources[1].ews_ulr: unknown setting; did you mean 'ews_url'?"]


GRAPH = """\
  - name: online
    kind: graph
    tenant_id: contoso.onmicrosoft.com
    client_id: 11111111-2222-3333-4444-555555555555
    certificate_ref: vault:online
    mailboxes: [room9@contoso.com]
"""


def test_a_graph_source_sits_beside_an_ews_source(tmp_path):
    config = load_config(write(tmp_path, SOURCES + GRAPH), env={"BERLIN_PASSWORD": "x"})
    onprem, berlin, online = config.calendar_sources
    assert (onprem.kind, berlin.kind, online.kind) == ("ews", "ews", "graph")
    assert isinstance(online, GraphSourceConfig) and online.mailboxes == ("room9@contoso.com",)
    assert online.secret_ref == SecretRef("vault", "online") and online.credential == "certificate"
    assert (online.authority_host, online.graph_url) == ("https://login.microsoftonline.com",
                                                         "https://graph.microsoft.com/v1.0")


def test_a_graph_source_says_what_is_wrong_with_it_and_an_unknown_kind_names_the_kinds(tmp_path):
    text = GRAPH.replace("    certificate_ref: vault:online\n", "    secret_expires: soon\n").replace(
        "tenant_id", "tennant_id")
    path = write(tmp_path, SOURCES + text + "  - name: imap\n    kind: imap\n")
    assert problems_of(path, {"BERLIN_PASSWORD": "x"}) == [
        f"{path}:13: sources[2].tenant_id: required: the Microsoft 365 tenant: its id (a GUID) or a verified domain",
        f"{path}:13: sources[2].client_secret_ref: required: certificate_ref (preferred) or client_secret_ref: where "
        "the app registration's credential is",
        f"{path}:15: sources[2].tennant_id: unknown setting; did you mean 'tenant_id'?",
        f"{path}:17: sources[2].secret_expires: must be a date, written YYYY-MM-DD",
        f"{path}:19: sources[3]: kind must be ews (on-premise Exchange 2013-2019 over EWS) or graph (Exchange Online "
        "through Microsoft Graph)"]


def test_a_room_belongs_to_exactly_one_source_and_a_name_to_one_source(tmp_path):
    text = SOURCES.replace("name: berlin", "name: onprem")
    path = write(tmp_path, text.replace("room_lists: [allrooms@berlin.contoso.com]",
                                        "mailboxes: [room3@contoso.com, ROOM1@contoso.com]"))
    assert problems_of(path, {"BERLIN_PASSWORD": "x"}) == [
        f"{path}:7: sources[1].name: is the name of sources[0] too; give every source a name of its own",
        f"{path}:12: sources[1].mailboxes[1]: room1@contoso.com is listed by source 'onprem' too; a room belongs to "
        "exactly one source, so remove it from one of them"]


def test_the_single_source_form_and_sources_do_not_mix(tmp_path):
    path = write(tmp_path, MINIMAL + SOURCES)
    problems = problems_of(path, {"BERLIN_PASSWORD": "x"})
    assert problems == [f"{path}:6: sources: use either exchange: (one Exchange organisation) or sources: (several), "
                        "not both; move the exchange: settings into sources: as one more item with name: exchange and "
                        "kind: ews"]
    path = write(tmp_path, SOURCES + "rooms:\n  mailboxes: [room9@contoso.com]\n  days_back: 3\n")
    assert problems_of(path, {"BERLIN_PASSWORD": "x"}) == [
        f"{path}:14: rooms.mailboxes: with sources:, each source lists its own rooms: move these to the mailboxes of "
        "the source they belong to (sources[N].mailboxes)"]


def test_a_source_is_overridden_from_the_environment_by_its_name(tmp_path):
    path = write(tmp_path, SOURCES)
    env = {"BERLIN_PASSWORD": "x", "GATEWAY_SOURCES__BERLIN__TIMEOUT_SECONDS": "30",
           "GATEWAY_SOURCES__ONPREM__MAILBOXES": "room7@contoso.com,room8@contoso.com"}
    onprem, berlin = load_config(path, env=env).calendar_sources
    assert berlin.timeout_seconds == 30.0 and onprem.mailboxes == ("room7@contoso.com", "room8@contoso.com")
    env = {"BERLIN_PASSWORD": "x", "GATEWAY_SOURCES__MUNICH__USERNAME": "svc@contoso.com",
           "GATEWAY_SOURCES__BERLIN__MAX_CONCURRENT_REQUESTS": "50"}
    assert problems_of(path, env) == [
        "env GATEWAY_SOURCES__MUNICH__USERNAME: sources.munich: there is no item named 'munich' in the file (names: "
        "onprem, berlin); items of a list are overridden by their name",
        "env GATEWAY_SOURCES__BERLIN__MAX_CONCURRENT_REQUESTS: sources[1].max_concurrent_requests: must be between 1 "
        "and 27, not 50 (Exchange allows 27 concurrent EWS requests per account by default; stay at 10 or below to "
        "leave room for other clients)"]


def test_privacy_exceptions_name_a_room_of_any_source(tmp_path):
    path = write(tmp_path, SOURCES.replace("room_lists: [allrooms@berlin.contoso.com]", "mailboxes: [hall@contoso.com]")
                 + "rooms:\n  privacy:\n    rooms:\n      hall@contoso.com: {subject: drop}\n"
                   "      room3@contoso.com: {subject: drop}\n")
    problems = problems_of(path, {"BERLIN_PASSWORD": "x"})
    assert len(problems) == 1 and problems[0].startswith(f"{path}:17: rooms.privacy.rooms.room3@contoso.com: is not a "
                                                         "configured room")


def test_the_example_multi_source_block_loads_in_place_of_exchange(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# sources:\n"):text.index("\nsync:")].strip().splitlines()
    sources = yaml.safe_load("\n".join(line[2:] for line in block))
    example = yaml.safe_load(text)
    del example["exchange"], example["rooms"]["mailboxes"], example["rooms"]["room_lists"]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**example, **sources}))
    config = load_config(path, env={"BERLIN_EWS_PASSWORD": "x"})
    assert [(s.name, s.kind, s.secret_ref) for s in config.calendar_sources] == [
        ("onprem", "ews", SecretRef("vault", "onprem")), ("berlin", "ews", SecretRef("env", "BERLIN_EWS_PASSWORD"))]
    assert config.rooms.privacy.for_room("boardroom@contoso.com").subject == "drop"


def test_the_organizer_policy_defaults_and_a_booking_group_needs_a_directory(tmp_path):
    c = load_config(write(tmp_path, MINIMAL), env={}).commands
    assert (c.unknown_organizer, c.disabled_organizer, c.booking_group) == ("external", "refuse", None)
    path = write(tmp_path, MINIMAL + "commands:\n  unknown_organizer: ignore\n  booking_group: CN=Bookers,DC=x\n")
    found = problems_of(path)
    assert any("commands.unknown_organizer: 'ignore' is not one of external, refuse" in p for p in found), found
    path = write(tmp_path, MINIMAL + "commands:\n  booking_group: CN=Bookers,DC=x\n")
    (problem,) = problems_of(path)
    assert "commands.booking_group: needs a directory: section" in problem and "remove booking_group" in problem
