"""The gateway's relay identity: an Ed25519 key made here, kept encrypted in the vault, rotated in two steps."""

from __future__ import annotations

import base64
import json

import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.relay import protocol
from gateway.security.identity import ENTRY, GatewayIdentity, verify
from gateway.security.secret import Secret
from gateway.security.vault import Vault, parse_key


def _seed(identity: GatewayIdentity) -> str:
    """The private key as stored (reaching inside on purpose: no public API hands it out)."""
    return identity._state.key.to_doc()["private"]


def _enrolled(vault: Vault) -> GatewayIdentity:
    identity = GatewayIdentity.generate(vault)
    identity.enroll(gateway_id="gw_1", customer="acme", hub_url="wss://hub.example/v1/tunnel")
    return identity


def test_generated_key_is_stored_only_once_enrolled_and_loads_back_identically(vault: Vault) -> None:
    identity = GatewayIdentity.generate(vault)
    assert not identity.enrolled and not GatewayIdentity.exists(vault)
    with pytest.raises(ConfigError) as e:
        identity.gateway_id
    assert e.value.key == "relay_not_enrolled"

    identity.enroll(gateway_id="gw_1", customer="acme", hub_url="wss://hub.example/v1/tunnel")
    loaded = GatewayIdentity.load(vault)
    assert loaded.enrolled
    assert (loaded.gateway_id, loaded.customer, loaded.hub_url) == ("gw_1", "acme", "wss://hub.example/v1/tunnel")
    assert loaded.public_key_b64 == identity.public_key_b64
    assert loaded.key_id == identity.key_id == protocol.key_id_for(protocol.unb64(identity.public_key_b64))
    assert len(protocol.unb64(loaded.public_key_b64)) == 32
    message = protocol.signed_challenge("nonce-1", "gw_1", loaded.key_id)
    signature = loaded.sign(message)
    assert verify(identity.public_key_b64, signature, message)
    assert not verify(identity.public_key_b64, signature, protocol.signed_challenge("nonce-2", "gw_1", loaded.key_id))


def test_private_key_is_not_readable_in_the_vault_file_nor_printed(vault: Vault) -> None:
    with capture_logs() as logs:
        identity = _enrolled(vault)
    seed = _seed(identity)
    raw = base64.urlsafe_b64decode(seed)
    blob = vault.path.read_bytes()
    assert seed.encode() not in blob and raw not in blob
    assert base64.b64encode(raw) not in blob and b"gw_1" not in blob and ENTRY.encode() not in blob
    doc = json.loads(blob)
    assert doc["format"] == "exchange-room-gateway/vault" and "ciphertext" in doc  # encrypted as a whole
    assert seed not in repr(identity) and seed not in str(logs)
    assert identity.key_id in repr(identity)


def test_a_different_vault_key_cannot_read_the_identity(vault: Vault) -> None:
    _enrolled(vault)
    other = Vault(vault.path, parse_key(base64.b64encode(b"x" * 32).decode(), "other key"))
    with pytest.raises(ConfigError) as e:
        GatewayIdentity.load(other)
    assert e.value.key == "vault_key_mismatch"


def test_load_without_enrollment_says_how_to_enroll(vault: Vault) -> None:
    with pytest.raises(ConfigError) as e:
        GatewayIdentity.load(vault)
    assert e.value.key == "relay_not_enrolled" and "gateway enroll" in str(e.value)


def test_damaged_entry_is_refused_without_repeating_it(vault: Vault) -> None:
    vault.set(ENTRY, Secret('{"version": 1, "key": {"private": "c2VjcmV0LXNlZWQ", "key_id": "k_x"}}'))
    with pytest.raises(ConfigError) as e:
        GatewayIdentity.load(vault)
    assert e.value.key == "relay_identity_invalid"
    assert "c2VjcmV0LXNlZWQ" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_rotation_keeps_the_current_key_until_committed_and_survives_a_restart(vault: Vault) -> None:
    identity = _enrolled(vault)
    old_id, old_public = identity.key_id, identity.public_key_b64

    nxt = identity.begin_rotation()
    assert nxt.key_id != old_id and identity.key_id == old_id  # the current key still answers challenges
    assert identity.begin_rotation() == nxt  # an unfinished rotation keeps its next key (the hub may know it)

    restarted = GatewayIdentity.load(vault)  # a crash between begin and commit loses nothing
    assert restarted.key_id == old_id and restarted.next_key == nxt
    proof = protocol.signed_rotation("nonce", "gw_1", nxt.key_id)
    assert verify(nxt.public_key_b64, restarted.sign_with(nxt.key_id, proof), proof)
    assert verify(old_public, restarted.sign_with(old_id, proof), proof)
    with pytest.raises(KeyError):
        restarted.sign_with("k_unknown", proof)

    assert not restarted.commit_rotation("k_not_the_next_one")
    assert restarted.key_id == old_id
    assert restarted.commit_rotation(nxt.key_id)
    assert not restarted.commit_rotation(nxt.key_id)  # twice is harmless
    assert restarted.key_id == nxt.key_id and restarted.next_key is None
    assert verify(nxt.public_key_b64, restarted.sign(b"x"), b"x")

    again = GatewayIdentity.load(vault)
    assert again.key_id == nxt.key_id and again.public_key_b64 == nxt.public_key_b64 and again.next_key is None
    assert again.gateway_id == "gw_1"  # the enrollment is unchanged by a rotation


def test_abandoned_rotation_forgets_the_next_key(vault: Vault) -> None:
    identity = _enrolled(vault)
    first = identity.begin_rotation()
    identity.abandon_rotation()
    assert GatewayIdentity.load(vault).next_key is None
    assert identity.begin_rotation().key_id != first.key_id


def test_reload_sees_a_new_enrollment_by_another_process(vault: Vault) -> None:
    running = _enrolled(vault)
    replacement = GatewayIdentity.generate(vault)
    replacement.enroll(gateway_id="gw_2", customer="acme", hub_url="wss://hub.example/v1/tunnel")
    assert running.gateway_id == "gw_1"
    running.reload()
    assert running.gateway_id == "gw_2" and running.key_id == replacement.key_id
