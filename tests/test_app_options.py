"""Typed options from a configuration: the relay's identity and proxy password come from the vault."""

from __future__ import annotations

import base64

import pytest

from gateway.app import options_from_config
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.security.identity import GatewayIdentity
from gateway.security.secret import Secret
from gateway.security.vault import Vault, parse_key

KEY = base64.b64encode(b"k" * 32).decode()


def env_for(tmp_path, **extra: str) -> dict[str, str]:
    return {"GATEWAY_EXCHANGE__EWS_URL": "https://mail.contoso.com/EWS/Exchange.asmx",
            "GATEWAY_EXCHANGE__USERNAME": "svc@contoso.com", "GATEWAY_ROOMS__MAILBOXES": "room1@contoso.com",
            "GATEWAY_VAULT__PATH": str(tmp_path / "credentials.vault"), "GATEWAY_VAULT__KEY_ENV": "VAULT_KEY",
            "VAULT_KEY": KEY, "GATEWAY_RELAY__ENABLED": "true",
            "GATEWAY_RELAY__HUB_URL": "wss://hub.example/v1/tunnel", **extra}


def test_an_enabled_relay_needs_an_enrolled_identity_and_says_how(tmp_path):
    vault = Vault(tmp_path / "credentials.vault", parse_key(KEY, "test"))
    vault.set("exchange", Secret("pw"))
    env = env_for(tmp_path)
    with pytest.raises(ConfigError) as e:
        options_from_config(load_config(None, env), env)
    assert e.value.key == "not_enrolled" and "gateway enroll" in str(e.value)

    identity = GatewayIdentity.generate(vault)
    identity.enroll(gateway_id="gw_1", customer="acme", hub_url="wss://hub.example/v1/tunnel")
    vault.set("proxy", Secret("proxy-secret"))
    env = env_for(tmp_path, GATEWAY_RELAY__PROXY_URL="http://proxy.corp:3128", GATEWAY_RELAY__PROXY_USERNAME="gw",
                  GATEWAY_RELAY__PROXY_PASSWORD_REF="vault:proxy")
    options = options_from_config(load_config(None, env), env)
    assert options.identity is not None and options.identity.key_id == identity.key_id
    assert options.proxy_password == "proxy-secret" and options.relay.proxy_url == "http://proxy.corp:3128"
    assert "proxy-secret" not in repr(options)
