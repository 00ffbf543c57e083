"""``gateway credentials``: put secrets into the vault, list them, and resolve the references that name them.

This is wiring: it joins the configuration (``vault:`` section, each source's ``password_ref``) to the vault
adapter, so the vault itself knows nothing about the configuration file.

    gateway credentials set exchange            # prompts twice, without echo
    printf %s "$PW" | gateway credentials set exchange --stdin
    gateway credentials set graph --file app.pem  # a certificate and its key (PEM): checked, its end date said
    gateway credentials list                    # names and when they were set, never values
    gateway credentials delete exchange
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TextIO

from cryptography import x509

from gateway.config import CONFIG_PATH_ENV, Config, SecretRef, SourceConfig, VaultConfig, load_vault_config
from gateway.errors import ConfigError, GatewayError
from gateway.security.secret import NAME_RE, Secret
from gateway.security.vault import Vault, generate_key_file, key_from_env, read_key_file

Prompt = Callable[[str], str]


# -- resolving references --------------------------------------------------------------------------------------
def open_vault(cfg: VaultConfig, env: Mapping[str, str] = os.environ, *, create_key: bool = False,
               notices: TextIO | None = None) -> Vault:
    """The vault described by the configuration. With ``create_key``, a missing key file is generated
    (mode 0600) and where it went is written to ``notices``; an existing vault without its key is never given
    a new one, since that would not make it readable."""
    if cfg.key_env:
        return Vault(cfg.path, key_from_env(cfg.key_env, env))
    if not cfg.key_file.exists():
        if cfg.path.exists():
            raise ConfigError(f"the vault at {cfg.path} exists but its key file {cfg.key_file} does not",
                              key="vault_key_missing",
                              remedy="restore the key file, or point vault.key_file (or vault.key_env) at the key; "
                                     "if the key is lost, delete the vault and store every credential again")
        if not create_key:
            raise ConfigError(f"there is no vault key at {cfg.key_file} (and no vault yet)", key="vault_key_missing",
                              remedy="store the first credential with `gateway credentials set exchange`; it "
                                     "creates the key")
        generate_key_file(cfg.key_file)
        if notices is not None:
            print(f"created a new vault key at {cfg.key_file.resolve()} (mode 0600). Keep it apart from the vault "
                  "and back it up: without it the vault cannot be read.", file=notices)
    return Vault(cfg.path, read_key_file(cfg.key_file))


def resolve_secret(ref: SecretRef, vault: VaultConfig, env: Mapping[str, str] = os.environ) -> Secret:
    """The secret a reference points at: a vault entry, or an environment variable."""
    if ref.scheme == "env":
        value = env.get(ref.name)
        if not value:
            raise ConfigError(f"the secret reference {ref} names the environment variable {ref.name}, which is "
                              "not set", key="credential_missing",
                              remedy=f"set {ref.name}, or store the secret with `gateway credentials set NAME` "
                                     "and refer to it as vault:NAME")
        return Secret(value)
    return open_vault(vault, env).get(ref.name)


def resolve_password(config: Config, env: Mapping[str, str] = os.environ, source: SourceConfig | None = None) -> Secret:
    """A source's service account password (by default the first source's, e.g. that of ``exchange:``), from
    wherever its ``password_ref`` says it is."""
    chosen = source if source is not None else config.calendar_sources[0]
    return resolve_secret(chosen.secret_ref, config.vault, env)


# -- the commands ----------------------------------------------------------------------------------------------
def set_credential(cfg: VaultConfig, name: str, *, from_stdin: bool = False, env: Mapping[str, str] = os.environ,
                   stdin: TextIO | None = None, out: TextIO | None = None, notices: TextIO | None = None,
                   prompt: Prompt = getpass.getpass, from_file: Path | None = None) -> int:
    """Store one secret: prompted twice without echo on a terminal, read from standard input (``--stdin``,
    one trailing newline removed) or from a file (``--file``, e.g. a PEM certificate with its key). A text that
    holds a certificate must parse, and its end date is said. The key file is created first if there is none yet.
    A running gateway notices the vault changed within seconds and uses the new secret: no restart."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    notices = notices or sys.stderr
    _check_name(name)
    vault = open_vault(cfg, env, create_key=True, notices=notices)
    vault.names()  # a wrong key or a damaged vault fails now, before anyone types a password
    secret = _read_file(from_file) if from_file is not None else _read_secret(name, from_stdin, stdin, prompt)
    ends = certificate_end(secret.reveal())
    vault.set(name, secret)
    print(f"stored '{name}' in the vault at {vault.path.resolve()}; a running gateway picks it up within seconds "
          "(no restart)", file=out)
    if ends is not None:
        print(f"its certificate is valid until {ends.isoformat()}", file=out)
    return 0


def certificate_end(text: str) -> datetime | None:
    """The end (notAfter) of the first certificate in a PEM text, None if the text holds none; a certificate that
    cannot be read is refused (nothing is stored)."""
    if "-----BEGIN CERTIFICATE-----" not in text:
        return None
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as e:
        raise ConfigError(f"the text holds a certificate that cannot be read ({e}); nothing was stored",
                          key="invalid_certificate",
                          remedy="give the PEM file as exported (-----BEGIN CERTIFICATE----- ... -----END "
                                 "CERTIFICATE-----), with --file PATH") from None
    return certs[0].not_valid_after_utc


def _read_file(path: Path) -> Secret:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", key="unreadable_file",
                          remedy="give a readable text file (a PEM certificate and key, or a secret)") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; nothing was stored", key="secret_empty",
                          remedy="give the file that holds the secret")
    return Secret(text)


def list_credentials(cfg: VaultConfig, *, env: Mapping[str, str] = os.environ, out: TextIO | None = None,
                     notices: TextIO | None = None) -> int:
    """Print ``name<TAB>updated_at`` per entry, never a value."""
    out = out or sys.stdout
    notices = notices or sys.stderr
    if not cfg.path.exists():
        print(f"no vault at {cfg.path.resolve()} yet; add an entry with `gateway credentials set exchange`",
              file=notices)
        return 0
    for entry in open_vault(cfg, env).entries():
        print(f"{entry.name}\t{entry.updated_at}", file=out)
    return 0


def delete_credential(cfg: VaultConfig, name: str, *, env: Mapping[str, str] = os.environ,
                      out: TextIO | None = None, notices: TextIO | None = None) -> int:
    out = out or sys.stdout
    notices = notices or sys.stderr
    _check_name(name)
    if not cfg.path.exists() or not open_vault(cfg, env).delete(name):
        print(f"the vault has no entry '{name}'", file=notices)
        return 1
    print(f"deleted '{name}' from the vault at {cfg.path.resolve()}", file=out)
    return 0


def _read_secret(name: str, from_stdin: bool, stdin: TextIO, prompt: Prompt) -> Secret:
    if from_stdin:
        text = stdin.read()
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    else:
        if not stdin.isatty():
            raise ConfigError("standard input is not a terminal, so the secret cannot be prompted for",
                              key="no_terminal",
                              remedy=f"pipe it in instead: printf %s \"$SECRET\" | gateway credentials set {name} "
                                     "--stdin")
        text = prompt(f"Secret for '{name}' (not shown): ")
        if text and prompt("Once more, to confirm: ") != text:
            raise ConfigError("the two entries differ; nothing was stored", key="secret_mismatch",
                              remedy="run the command again")
    if not text:
        raise ConfigError("the secret is empty; nothing was stored", key="secret_empty",
                          remedy="enter the secret, or pipe it with --stdin")
    return Secret(text)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"{name!r} is not a valid credential name", key="invalid_credential_name",
                          remedy="use letters, digits, '.', '_' and '-' (up to 64 characters), e.g. exchange")


# -- argparse --------------------------------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``credentials {set,list,delete}`` to the gateway's command line; dispatch with :func:`run_cli`."""
    parser = subparsers.add_parser(
        "credentials", help="store the secrets the gateway uses in its encrypted vault",
        description="Store secrets in the gateway's encrypted vault. The configuration refers to an entry "
                    "by name (exchange.password_ref: vault:exchange), never by value.")
    sub = parser.add_subparsers(dest="credentials_command", required=True, metavar="{set,list,delete}")
    p_set = sub.add_parser("set", help="store a secret: prompted without echo, or piped with --stdin",
                           description="Store a secret under NAME. On a terminal it is asked for twice without "
                                       "echo; with --stdin it is read from standard input (one trailing newline "
                                       "is removed); with --file from a file (a PEM certificate is checked and its "
                                       "end date said). Creates the vault key file if there is none yet. A running "
                                       "gateway picks the new secret up within seconds, without a restart.")
    p_set.add_argument("name", help="the entry's name, e.g. exchange (what vault:exchange refers to)")
    how = p_set.add_mutually_exclusive_group()
    how.add_argument("--stdin", action="store_true", help="read the secret from standard input")
    how.add_argument("--file", metavar="PATH", type=Path,
                     help="read the secret from a file, e.g. a PEM certificate with its private key")
    p_list = sub.add_parser("list", help="list the entries' names and when they were set (never the values)",
                            description="List the vault's entries: each name and when it was set. Values are "
                                        "never shown.")
    p_delete = sub.add_parser("delete", help="remove an entry", description="Remove an entry from the vault.")
    p_delete.add_argument("name", help="the entry's name, e.g. exchange")
    for p in (p_set, p_list, p_delete):
        # SUPPRESS: when not given, leave args.config alone (a global --config, if the CLI grows one, survives)
        p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=f"the configuration file; only its vault section is read (default: ${CONFIG_PATH_ENV}, "
                            "else the built-in defaults and GATEWAY_* variables)")
    return parser


def run_cli(args: argparse.Namespace, *, env: Mapping[str, str] = os.environ, stdin: TextIO | None = None,
            stdout: TextIO | None = None, stderr: TextIO | None = None, prompt: Prompt = getpass.getpass) -> int:
    """Run a parsed ``credentials`` command. Reads only the vault section of the configuration (``args.config``
    if the parser defines it, else ``GATEWAY_CONFIG``, else defaults and environment). Errors are printed with
    their remedy; the exit status is 0 on success, 1 for a missing entry, 2 for an error."""
    stderr = stderr or sys.stderr
    config_path: str | Path | None = getattr(args, "config", None)
    try:
        cfg = load_vault_config(config_path, env)
        command = args.credentials_command
        if command == "set":
            return set_credential(cfg, args.name, from_stdin=args.stdin, env=env, stdin=stdin, out=stdout,
                                  notices=stderr, prompt=prompt, from_file=getattr(args, "file", None))
        if command == "list":
            return list_credentials(cfg, env=env, out=stdout, notices=stderr)
        if command == "delete":
            return delete_credential(cfg, args.name, env=env, out=stdout, notices=stderr)
        raise ConfigError(f"unknown credentials command {command!r}")
    except GatewayError as e:
        print(f"error: {e}", file=stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was stored", file=stderr)
        return 130
