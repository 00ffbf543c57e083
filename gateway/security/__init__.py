"""Secrets: the Secret type that never prints, and the encrypted vault that stores them by name."""

from gateway.security.secret import MASK, Secret
from gateway.security.vault import (
    Vault,
    VaultEntry,
    VaultKey,
    generate_key_file,
    key_from_env,
    new_key_text,
    parse_key,
    read_key_file,
)

__all__ = [
    "MASK",
    "Secret",
    "Vault",
    "VaultEntry",
    "VaultKey",
    "generate_key_file",
    "key_from_env",
    "new_key_text",
    "parse_key",
    "read_key_file",
]
