"""``gateway enroll``: make the gateway's key pair and register its public half at the hub, once.

    gateway enroll --hub https://hub.vendor.example --token TOKEN [--name NAME] [--config gateway.yaml]

1. Generates an Ed25519 key pair here (gateway/security/identity.py). The private key never leaves the gateway.
2. POSTs ``{token, public_key, name, signature}`` to ``HUB/v1/enroll`` (protocol.ENROLL_PATH); the signature, by
   the new key over ``protocol.signed_enrollment(token, public_key)``, proves the gateway holds the private key.
   TLS is verified (``relay.ca_bundle`` or the system store; ``--ca-bundle`` for this run), through
   ``relay.proxy_url`` when set. The token is single-use and expires: the hub answers 410 for a used or expired
   token and 401 for one it does not know.
3. Stores the identity (key, gateway id, customer, tunnel URL) in the encrypted vault and prints the settings to
   put in the configuration (``relay.enabled: true``, ``relay.hub_url: <the tunnel URL the hub answered>``).

A gateway that is already enrolled is left alone unless ``--force`` is given; even then the stored identity is
replaced only once the hub has accepted the new key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp

from gateway import config as config_module
from gateway.config import CONFIG_PATH_ENV, RelayConfig, VaultConfig
from gateway.credentials import open_vault, resolve_secret
from gateway.errors import AuthError, ConfigError, GatewayError, ProtocolError, Unavailable
from gateway.relay import protocol
from gateway.relay.connection import AGENT, client_ssl_context, describe_connect_error, proxy_headers
from gateway.security.identity import ENTRY, GatewayIdentity
from gateway.security.vault import Vault

ENROLL_TIMEOUT = 30.0


class EnrollmentRefused(AuthError):
    key = "enrollment_refused"
    remedy = "ask the hub operator for a new enrollment token"


class AlreadyEnrolled(ConfigError):
    """Nothing is wrong: the gateway has its identity (``gateway enroll`` exits 1, not 2)."""

    key = "already_enrolled"
    remedy = "nothing to do; to enroll it anew (a new key, e.g. at another hub) add --force"


# -- settings ----------------------------------------------------------------------------------------------------
def load_settings(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> tuple[VaultConfig, RelayConfig]:
    """Only the vault and relay sections: enrolling works before the rest of the file is finished."""
    return config_module.load_relay_config(path, env)


def enroll_url(hub: str) -> str:
    parts = urlsplit(hub.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"--hub must be the hub's https:// address, not {hub[:80]!r}", key="invalid_hub_url",
                          remedy="use the address the hub operator gave you, e.g. https://hub.vendor.example")
    base = hub.strip().rstrip("/")
    return base if base.endswith(protocol.ENROLL_PATH) else base + protocol.ENROLL_PATH


# -- enrolling ---------------------------------------------------------------------------------------------------
async def enroll(hub: str, token: str, *, vault: Vault, relay: RelayConfig, name: str,
                 proxy_password: str | None = None, force: bool = False,
                 ca_bundle: Path | None = None) -> GatewayIdentity:
    """Enroll at the hub and store the identity in ``vault``; return it. GatewayError with a remedy otherwise."""
    url = enroll_url(hub)
    if not token or len(token) > 4096:
        raise ConfigError("the enrollment token is empty or malformed", key="invalid_token",
                          remedy="paste the token exactly as the hub operator issued it")
    _check_not_enrolled(vault, force)
    identity = GatewayIdentity.generate(vault)
    public_key = identity.public_key_b64
    body = {"token": token, "public_key": public_key, "name": name,
            "signature": protocol.b64(identity.sign(protocol.signed_enrollment(token, public_key)))}
    ca = ca_bundle or relay.ca_bundle
    answer = await _post(url, body, ca_bundle=ca, relay=relay, proxy_password=proxy_password)
    gateway_id, tunnel_url = answer.get("gateway_id"), answer.get("tunnel_url")
    if not isinstance(gateway_id, str) or not gateway_id:
        raise ProtocolError("the hub accepted the enrollment but did not say the gateway's id", key="bad_message",
                            remedy="report this to the hub operator; the token is probably used up now")
    if not isinstance(tunnel_url, str) or urlsplit(tunnel_url).scheme != "wss":
        raise ProtocolError(f"the hub answered an unusable tunnel_url {str(tunnel_url)[:80]!r} (expected wss://)",
                            key="bad_message", remedy="report this to the hub operator")
    if answer.get("key_id") not in (None, identity.key_id):
        raise ProtocolError("the hub registered a different key id than this gateway's key", key="bad_message",
                            remedy="report this to the hub operator")
    customer = answer.get("customer")
    try:
        await asyncio.to_thread(identity.enroll, gateway_id=gateway_id,
                                customer=customer if isinstance(customer, str) else None, hub_url=tunnel_url)
    except GatewayError as e:
        raise ConfigError(f"the hub enrolled gateway {gateway_id}, but its key could not be stored: {e}",
                          key="vault_unwritable",
                          remedy="fix the vault, then enroll again with a new token (this one is used up)") from None
    return identity


def _check_not_enrolled(vault: Vault, force: bool) -> None:
    vault.names()  # a wrong vault key or a damaged vault fails now, before the token is spent
    if force or not GatewayIdentity.exists(vault):
        return
    try:
        existing = GatewayIdentity.load(vault)
    except ConfigError as e:
        raise ConfigError(f"the vault holds a relay identity that cannot be read ({e.key})",
                          key="relay_identity_invalid", remedy="enroll again with --force to replace it") from None
    if existing.enrolled:
        raise AlreadyEnrolled(f"this gateway is already enrolled as {existing.gateway_id} (key {existing.key_id})")


async def _post(url: str, body: dict[str, Any], *, ca_bundle: Path | None, relay: RelayConfig,
                proxy_password: str | None) -> dict[str, Any]:
    ctx = client_ssl_context(ca_bundle)
    what = f"the hub ({url})"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENROLL_TIMEOUT), trust_env=False) as s, \
                s.post(url, json=body, ssl=ctx, proxy=relay.proxy_url,
                       proxy_headers=proxy_headers(relay, proxy_password),
                       headers={"User-Agent": AGENT}) as resp:
            text = await resp.text(errors="replace")
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        key, message = describe_connect_error(e, what=what, ca_bundle=ca_bundle, proxy_url=relay.proxy_url)
        if key == "tls_error":
            message += " (for this run only: --ca-bundle FILE)"
            raise ConfigError(message, key=key, remedy="") from None
        raise Unavailable(message, key=key, remedy="") from None
    answer = _json(text)
    if status in (200, 201):
        if answer is None:
            raise ProtocolError(f"{what} answered {status} without a JSON body", key="bad_message",
                                remedy="check --hub: it must be the hub's address")
        return answer
    said = _said(answer)
    if status == 410:
        raise EnrollmentRefused(f"the enrollment token has expired or was already used{said}",
                                key="token_expired")
    if status == 401:
        raise EnrollmentRefused(f"the hub does not accept this enrollment token{said}", key="token_invalid",
                                remedy="check that you copied the whole token, or ask for a new one")
    if status == 403:
        raise EnrollmentRefused(f"the hub refused the enrollment{said}", key="enrollment_forbidden")
    if status in (404, 405):
        raise ConfigError(f"{what} has no enrollment endpoint ({status})", key="invalid_hub_url",
                          remedy="check --hub: the hub's base address, e.g. https://hub.vendor.example")
    if status == 409:
        raise EnrollmentRefused(f"the hub already knows this key or gateway{said}", key="enrollment_conflict")
    if status >= 500:
        raise Unavailable(f"{what} failed ({status}){said}", key="hub_error",
                          remedy="try again later; the token is not used up by a failed request")
    raise ProtocolError(f"{what} refused the enrollment ({status}){said}", key="enrollment_refused",
                        remedy="report this to the hub operator")


def _json(text: str) -> dict[str, Any] | None:
    try:
        value = protocol.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _said(answer: dict[str, Any] | None) -> str:
    if not answer:
        return ""
    message = answer.get("message") or answer.get("error") or answer.get("code")
    return f": the hub says {str(message)[:300]!r}" if message else ""


# -- argparse ----------------------------------------------------------------------------------------------------
EPILOG = """\
The hub operator issues the token (single-use, it expires). Then:
  gateway enroll --hub https://hub.vendor.example --token TOKEN --config gateway.yaml
  printf %s "$TOKEN" | gateway enroll --hub https://hub.vendor.example --token - --config gateway.yaml
It prints the relay settings to add to the configuration; restart the gateway afterwards.
"""


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``enroll`` to the gateway's command line; dispatch with :func:`run_cli`."""
    parser = subparsers.add_parser(
        "enroll", help="register this gateway at the booking vendor's hub (once, with a token)",
        description="Generate this gateway's key pair (kept in the encrypted vault; the private key never leaves "
                    "the gateway) and register its public key at the hub with a single-use enrollment token.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", required=True, metavar="URL", help="the hub's https:// address")
    parser.add_argument("--token", required=True, help="the enrollment token ('-': read it from standard input)")
    parser.add_argument("--name", default=None, help="a name for this gateway at the hub (default: the host name)")
    parser.add_argument("--force", action="store_true",
                        help="enroll again even though the gateway is already enrolled (a new key)")
    parser.add_argument("--ca-bundle", type=Path, default=None, metavar="FILE",
                        help="PEM file of CAs to trust for the hub, for this run (default: relay.ca_bundle, "
                             "else the system store)")
    parser.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"the configuration file; only its vault and relay sections are read (default: "
                             f"${CONFIG_PATH_ENV}, else the built-in defaults and GATEWAY_* variables)")
    return parser


def run_cli(args: argparse.Namespace, *, env: Mapping[str, str] = os.environ, stdin: TextIO | None = None,
            stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run a parsed ``enroll``: 0 enrolled, 1 already enrolled (nothing done), 2 an error (printed with remedy)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    config_path: str | Path | None = getattr(args, "config", None)
    try:
        vault_cfg, relay = load_settings(config_path, env)
        token = stdin.read().strip() if args.token == "-" else args.token.strip()
        vault = open_vault(vault_cfg, env, create_key=True, notices=stderr)
        proxy_password = (resolve_secret(relay.proxy_password_ref, vault_cfg, env).reveal()
                          if relay.proxy_url and relay.proxy_password_ref else None)
        name = args.name or socket.gethostname()
        identity = asyncio.run(enroll(args.hub, token, vault=vault, relay=relay, name=name,
                                      proxy_password=proxy_password, force=args.force, ca_bundle=args.ca_bundle))
    except AlreadyEnrolled as e:
        print(f"error: {e}", file=stderr)
        return 1
    except GatewayError as e:
        print(f"error: {e}", file=stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=stderr)
        return 130
    print(f"enrolled: gateway {identity.gateway_id}" + (f" of {identity.customer}" if identity.customer else "")
          + f", key {identity.key_id}", file=stdout)
    print(f"the private key is in the vault at {vault.path.resolve()} (entry {ENTRY}); it never leaves this "
          "gateway", file=stdout)
    print("\nput this in the configuration (relay section) and restart the gateway:\n", file=stdout)
    print("relay:\n  enabled: true\n" f"  hub_url: {identity.hub_url}", file=stdout)
    if args.ca_bundle is not None and relay.ca_bundle is None:
        print(f"  ca_bundle: {args.ca_bundle.resolve()}", file=stdout)
    return 0


def register_rotate_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``rotate-key``: ask for a new relay key now (a suspected leak, a policy), without downtime."""
    parser = subparsers.add_parser(
        "rotate-key", help="replace this gateway's relay key now (the tunnel stays up)",
        description="Generate the gateway's next relay key in the vault. The running gateway notices within five "
                    "minutes, registers it over its live tunnel and switches to it; a stopped gateway does so at "
                    "its next start. The old key stays valid until the hub has seen the new one.")
    parser.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"the configuration file; only its vault section is read (default: ${CONFIG_PATH_ENV}, "
                             "else the built-in defaults and GATEWAY_* variables)")
    return parser


def run_rotate_cli(args: argparse.Namespace, *, env: Mapping[str, str] = os.environ,
                   stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        vault_cfg, _relay = load_settings(getattr(args, "config", None), env)
        identity = GatewayIdentity.load(open_vault(vault_cfg, env))
        nxt = identity.begin_rotation()
    except GatewayError as e:
        print(f"error: {e}", file=stderr)
        return 2
    print(f"next key {nxt.key_id} is ready (current {identity.key_id}); the running gateway switches to it within "
          "5 minutes, a stopped one at its next start (watch for tunnel.key_rotated in its log)", file=stdout)
    return 0
