"""``gateway api-keys``: keys for the local API (create, list, revoke), in the gateway's store file.

    gateway api-keys create "lobby display" --scope read
    gateway api-keys create booking-system --scope read --scope book
    gateway api-keys list                      # ids, names, scopes, dates; never a secret
    gateway api-keys revoke 3f2a9c0d1e4b5a69   # refused by a running gateway within seconds

``create`` prints the key alone on standard output (so ``KEY=$(gateway api-keys create ...)`` works) and how to
use it on standard error. The key is shown only then: the store keeps a hash of it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, TextIO

from gateway.config import CONFIG_PATH_ENV, ApiConfig, StoreConfig, load_local_config
from gateway.errors import ConfigError, GatewayError
from gateway.store.apikeys import CACHE_SECONDS, SCOPES, ApiKeys, key_id_of
from gateway.store.sqlite import SqliteStore


class LocalSettings(NamedTuple):
    """What managing API keys needs of the configuration: where the store is and where the API listens."""

    store: StoreConfig
    api: ApiConfig


def create_key(cfg: LocalSettings, name: str, scopes: list[str], *, out: TextIO, notices: TextIO) -> int:
    store = SqliteStore(cfg.store.path)
    try:
        token = ApiKeys(store).create(name, scopes)
    finally:
        store.close()
    key_id = key_id_of(token)
    base = f"http://{cfg.api.host}:{cfg.api.port}"
    print(token, file=out, flush=True)
    print(f"created API key {key_id} '{name}' with scope(s) {', '.join(dict.fromkeys(scopes))}.\n"
          f"It is shown only this once (the store keeps a hash of it); keep it in the client's secret store.\n"
          f"Send it with every request as a header:\n"
          f"  Authorization: Bearer <the key>\n"
          f"for example:  curl -H \"Authorization: Bearer $KEY\" {base}/v1/rooms", file=notices)
    return 0


def list_keys(cfg: LocalSettings, *, out: TextIO, notices: TextIO) -> int:
    """One row per key: id, name, scopes, created, last used, revoked. Never a secret or a hash."""
    if not cfg.store.path.exists():
        print(f"no store at {cfg.store.path} yet; create a key with `gateway api-keys create NAME --scope read`",
              file=notices)
        return 0
    store = SqliteStore(cfg.store.path)
    try:
        keys = ApiKeys(store).list()
    finally:
        store.close()
    rows = [("ID", "NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED")]
    rows += [(k.id, k.name, ",".join(k.scopes), _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at))
             for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths, strict=False)) + "  " + r[-1], file=out)
    if not keys:
        print("no API keys yet; create one with `gateway api-keys create NAME --scope read`", file=notices)
    return 0


def revoke_key(cfg: LocalSettings, key_id: str, *, out: TextIO, notices: TextIO) -> int:
    key_id = key_id_of(key_id) or key_id  # the whole key works too
    if not cfg.store.path.exists():
        print(f"no store at {cfg.store.path}, so there is no key {key_id}", file=notices)
        return 1
    store = SqliteStore(cfg.store.path)
    try:
        keys = ApiKeys(store)
        before = {k.id: k for k in keys.list()}.get(key_id)
        if before is None or not keys.revoke(key_id):
            print(f"there is no API key {key_id}; `gateway api-keys list` shows the ids", file=notices)
            return 1
    finally:
        store.close()
    if before.revoked_at is not None:
        print(f"API key {key_id} '{before.name}' was already revoked ({_when(before.revoked_at)})", file=out)
    else:
        print(f"revoked API key {key_id} '{before.name}'; a running gateway refuses it within "
              f"{CACHE_SECONDS:g} seconds", file=out)
    return 0


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- argparse --------------------------------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``api-keys {create,list,revoke}`` to the gateway's command line; dispatch with :func:`run_cli`."""
    scopes = "; ".join(f"{name}: {what}" for name, what in SCOPES.items())
    parser = subparsers.add_parser(
        "api-keys", help="create, list and revoke keys for the local API",
        description="Keys for the gateway's local API. Clients send one as 'Authorization: Bearer <key>'. "
                    f"Scopes: {scopes}.")
    sub = parser.add_subparsers(dest="api_keys_command", required=True, metavar="{create,list,revoke}")
    p_create = sub.add_parser("create", help="create a key and print it (once)",
                              description="Create a key with the given scopes. The key is printed on standard "
                                          "output, once; how to use it goes to standard error.")
    p_create.add_argument("name", help="who or what uses the key, e.g. 'lobby display'")
    p_create.add_argument("--scope", action="append", choices=tuple(SCOPES), required=True, dest="scopes",
                          help="what the key may do; repeat for several (read, book, metrics)")
    p_list = sub.add_parser("list", help="list the keys: id, name, scopes, created, last used, revoked",
                            description="List the keys: id, name, scopes, when each was created, last used and "
                                        "revoked. Never a key or its hash.")
    p_revoke = sub.add_parser("revoke", help="refuse a key from now on",
                              description="Revoke a key by its id (see `gateway api-keys list`). A running "
                                          f"gateway refuses it within {CACHE_SECONDS:g} seconds.")
    p_revoke.add_argument("id", help="the key's id (the whole key works too)")
    for p in (p_create, p_list, p_revoke):
        p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=f"the configuration file; its store.path is where the keys live (default: "
                            f"${CONFIG_PATH_ENV}, else the built-in defaults and GATEWAY_* variables)")
    return parser


def run_cli(args: argparse.Namespace, *, env: Mapping[str, str] = os.environ, stdout: TextIO | None = None,
            stderr: TextIO | None = None) -> int:
    """Run a parsed ``api-keys`` command. Exit status: 0 on success, 1 for an unknown key, 2 for an error."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    config_path: str | Path | None = getattr(args, "config", None)
    try:
        cfg = LocalSettings(*load_local_config(config_path, env))
        command = args.api_keys_command
        if command == "create":
            return create_key(cfg, args.name, args.scopes, out=stdout, notices=stderr)
        if command == "list":
            return list_keys(cfg, out=stdout, notices=stderr)
        if command == "revoke":
            return revoke_key(cfg, args.id, out=stdout, notices=stderr)
        raise ConfigError(f"unknown api-keys command {command!r}")
    except GatewayError as e:
        print(f"error: {e}", file=stderr)
        return 2
